//! Kubernetes resource quantities ("250m", "1.5", "128Mi", "1e3"), as the scheduler, quota
//! admission and limit ranges read them.

/// Parses a Kubernetes quantity ("250m", "1.5", "128Mi", "1e3", "2k") into whole units, or
/// milli-units when `milli`, rounding up as Kubernetes does.
pub fn parse(s: &str, milli: bool) -> Result<i64, String> {
    let bad = || format!("\"{s}\" is not a quantity (e.g. 500m, 2, 128Mi, 1G)");
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(num_end);
    let (neg, num) = match num.strip_prefix('-') {
        Some(n) => (true, n),
        None => (false, num.strip_prefix('+').unwrap_or(num)),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty())
        || !(int.chars().chain(frac.chars())).all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    // value = digits * 10^exp10 * 2^exp2
    let digits: i128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let mut exp10: i32 = -(frac.len() as i32) + if milli { 3 } else { 0 };
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        e if e.starts_with(['e', 'E']) => {
            exp10 += e[1..].parse::<i32>().map_err(|_| bad())?;
        }
        _ => return Err(bad()),
    }
    if !(-40..=40).contains(&exp10) {
        return Err(bad());
    }
    let mut v = digits.checked_mul(1i128 << exp2).ok_or_else(bad)?;
    if exp10 >= 0 {
        v = v.checked_mul(10i128.pow(exp10 as u32)).ok_or_else(bad)?;
    } else {
        let d = 10i128.pow((-exp10) as u32);
        v = (v + d - 1) / d;
    }
    let v = i64::try_from(v).map_err(|_| bad())?;
    Ok(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::parse as parse_quantity;

    #[test]
    fn quantities_parse_as_kubernetes_does() {
        assert_eq!(parse_quantity("250m", true), Ok(250));
        assert_eq!(parse_quantity("1.5", true), Ok(1500));
        assert_eq!(parse_quantity("2", true), Ok(2000));
        assert_eq!(parse_quantity("128Mi", false), Ok(128 << 20));
        assert_eq!(parse_quantity("1G", false), Ok(1_000_000_000));
        assert_eq!(parse_quantity("1e3", false), Ok(1000));
        assert_eq!(parse_quantity("1.5Gi", false), Ok(3 << 29));
        assert_eq!(parse_quantity("100n", true), Ok(1)); // rounds up
        assert_eq!(parse_quantity("0.1m", false), Ok(1));
        assert!(parse_quantity("ten", false).is_err());
        assert!(parse_quantity("1Qi", false).is_err());
        assert!(parse_quantity("", false).is_err());
    }
}
