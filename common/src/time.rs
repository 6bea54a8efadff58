//! Time as the Kubernetes API writes it.

/// Now, as an RFC 3339 timestamp to the second (`metav1.Time`'s form).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or(jiff::Timestamp::now())
        .to_string()
}
