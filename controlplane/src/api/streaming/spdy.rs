//! The client side of a SPDY/3.1 session, as much of it as Kubernetes' streaming protocols use
//! toward a kubelet or runtime (spdystream on the other end): streams opened by the client with
//! SYN_STREAM and a header block, answered by SYN_REPLY; DATA both ways, FIN half-closing a
//! stream; RST_STREAM; PING echoed; GOAWAY. Flow control is not used (spdystream neither sends
//! nor honours WINDOW_UPDATE), so those frames and SETTINGS are read and ignored.
//!
//! Header blocks are zlib-compressed as one stream per direction. This side sends without the
//! SPDY preset dictionary (a zlib stream without FDICT, which the peer's reader accepts) and
//! never needs to read the peer's blocks: the replies of the streams Kubernetes opens carry no
//! headers anyone reads, so their blocks are skipped, not inflated.

use anyhow::{bail, Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL.
pub const CANCEL: u32 = 5;
/// RST_STREAM status REFUSED_STREAM.
const REFUSED: u32 = 3;

/// The largest frame this side accepts (the protocol allows 16 MiB; kubelets write at most
/// 32 KiB at a time).
pub const MAX_FRAME: usize = 1 << 20;

/// A frame the peer sent, as far as a client of Kubernetes' protocols cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Bytes,
    },
    SynReply {
        stream: u32,
        fin: bool,
    },
    Reset {
        stream: u32,
        status: u32,
    },
    /// A stream the peer opened (Kubernetes' servers never do): to be refused.
    SynStream {
        stream: u32,
    },
    Ping(u32),
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS and unknown types: nothing to do.
    Ignored,
}

/// Frame encoding for one direction, with its header compression context.
pub struct Encoder {
    zlib: Compress,
    next_stream: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            zlib: Compress::new(Compression::default(), true),
            next_stream: 1,
        }
    }
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | len as u32);
}

impl Encoder {
    /// SYN_STREAM for the next client stream id (odd, rising) with `headers` (names lower
    /// case); returns the id.
    pub fn syn_stream(&mut self, out: &mut BytesMut, headers: &[(&str, &str)]) -> Result<u32> {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut raw = BytesMut::new();
        raw.put_u32(headers.len() as u32);
        for (k, v) in headers {
            raw.put_u32(k.len() as u32);
            raw.put_slice(k.as_bytes());
            raw.put_u32(v.len() as u32);
            raw.put_slice(v.as_bytes());
        }
        let block = self.compress(&raw)?;
        control(out, SYN_STREAM, 0, 10 + block.len());
        out.put_u32(id);
        out.put_u32(0); // associated stream
        out.put_u16(0); // priority 0 (highest), slot 0
        out.put_slice(&block);
        Ok(id)
    }

    /// The header block in the session's zlib stream, flushed to a byte boundary.
    fn compress(&mut self, raw: &[u8]) -> Result<Vec<u8>> {
        let start = self.zlib.total_in();
        let mut out = Vec::with_capacity(raw.len() + 64);
        loop {
            let done = (self.zlib.total_in() - start) as usize;
            self.zlib
                .compress_vec(&raw[done..], &mut out, FlushCompress::Sync)
                .context("compressing a SPDY header block")?;
            // A full buffer may hold a partial flush: give it room and go on.
            if (self.zlib.total_in() - start) as usize == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

/// A DATA frame (`fin` half-closes the stream after `data`).
pub fn data(out: &mut BytesMut, stream: u32, fin: bool, data: &[u8]) {
    out.put_u32(stream & 0x7fff_ffff);
    out.put_u32(((if fin { FLAG_FIN } else { 0 } as u32) << 24) | data.len() as u32);
    out.put_slice(data);
}

pub fn reset(out: &mut BytesMut, stream: u32, status: u32) {
    control(out, RST_STREAM, 0, 8);
    out.put_u32(stream);
    out.put_u32(status);
}

pub fn ping(out: &mut BytesMut, id: u32) {
    control(out, PING, 0, 4);
    out.put_u32(id);
}

pub fn go_away(out: &mut BytesMut) {
    control(out, GOAWAY, 0, 8);
    out.put_u32(0);
    out.put_u32(0);
}

/// Takes one whole frame off the front of `buf`, or `None` when more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
    if len > MAX_FRAME {
        bail!("a SPDY frame of {len} bytes (at most {MAX_FRAME} accepted)");
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let head = buf.split_to(8);
    let mut body = buf.split_to(len).freeze();
    let flags = head[4];
    let fin = flags & FLAG_FIN != 0;
    if head[0] & 0x80 == 0 {
        let stream = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        return Ok(Some(Frame::Data {
            stream,
            fin,
            data: body,
        }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    if version != VERSION {
        bail!("a SPDY control frame of version {version} (3 expected)");
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    let need = |n: usize| -> Result<()> {
        if len < n {
            bail!("a SPDY control frame of type {kind} with {len} bytes (at least {n} expected)");
        }
        Ok(())
    };
    Ok(Some(match kind {
        SYN_STREAM => {
            need(10)?;
            Frame::SynStream {
                stream: body.get_u32() & 0x7fff_ffff,
            }
        }
        SYN_REPLY => {
            need(4)?;
            Frame::SynReply {
                stream: body.get_u32() & 0x7fff_ffff,
                fin,
            }
        }
        RST_STREAM => {
            need(8)?;
            Frame::Reset {
                stream: body.get_u32() & 0x7fff_ffff,
                status: body.get_u32(),
            }
        }
        PING => {
            need(4)?;
            Frame::Ping(body.get_u32())
        }
        GOAWAY => Frame::GoAway,
        _ => Frame::Ignored,
    }))
}

/// The reading half of a session: frames off the connection, one at a time.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(64 << 10),
        }
    }

    /// The next frame, or `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            if self
                .io
                .read_buf(&mut self.buf)
                .await
                .context("reading SPDY")?
                == 0
            {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("the SPDY connection closed inside a frame");
            }
        }
    }
}

/// Writes `out` (whole frames) and empties it.
pub async fn flush<W: AsyncWrite + Unpin>(io: &mut W, out: &mut BytesMut) -> Result<()> {
    io.write_all(out).await.context("writing SPDY")?;
    io.flush().await.context("writing SPDY")?;
    out.clear();
    Ok(())
}

/// Opens one stream per header set and waits until the peer has answered each with SYN_REPLY
/// (what Kubernetes' clients do before sending on a stream), echoing pings meanwhile; returns
/// the stream ids in the order given. A refused stream names its headers.
pub async fn open_streams<R, W>(
    reader: &mut Reader<R>,
    writer: &mut W,
    enc: &mut Encoder,
    streams: &[Vec<(&str, &str)>],
) -> Result<Vec<u32>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    let mut ids = Vec::with_capacity(streams.len());
    for headers in streams {
        ids.push(enc.syn_stream(&mut out, headers)?);
    }
    flush(writer, &mut out).await?;
    let mut waiting = ids.clone();
    while !waiting.is_empty() {
        match reader.next().await? {
            Some(Frame::SynReply { stream, .. }) => waiting.retain(|s| *s != stream),
            Some(Frame::Reset { stream, status }) if ids.contains(&stream) => {
                let i = ids.iter().position(|s| *s == stream).unwrap_or(0);
                bail!(
                    "the stream {:?} was refused (RST_STREAM status {status})",
                    streams[i]
                );
            }
            Some(Frame::Ping(id)) => {
                ping(&mut out, id);
                flush(writer, &mut out).await?;
            }
            Some(Frame::SynStream { stream }) => {
                reset(&mut out, stream, REFUSED);
                flush(writer, &mut out).await?;
            }
            Some(Frame::GoAway) | None => bail!("the peer closed the SPDY session at its start"),
            Some(_) => {}
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// Inflates header blocks of one session (no dictionary needed: this side sets none) and
    /// parses the name/value pairs.
    fn headers(z: &mut Decompress, block: &[u8]) -> Vec<(String, String)> {
        let mut raw = Vec::with_capacity(4096);
        z.decompress_vec(block, &mut raw, FlushDecompress::Sync)
            .unwrap();
        let mut b = &raw[..];
        let n = b.get_u32();
        (0..n)
            .map(|_| {
                let l = b.get_u32() as usize;
                let k = String::from_utf8(b[..l].to_vec()).unwrap();
                b.advance(l);
                let l = b.get_u32() as usize;
                let v = String::from_utf8(b[..l].to_vec()).unwrap();
                b.advance(l);
                (k, v)
            })
            .collect()
    }

    #[test]
    fn syn_streams_carry_their_headers_in_one_zlib_stream() {
        let mut enc = Encoder::default();
        let mut inflate = Decompress::new(true);
        for (want_id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout")] {
            let mut out = BytesMut::new();
            let id = enc.syn_stream(&mut out, &[("streamtype", kind)]).unwrap();
            assert_eq!(id, want_id);
            assert_eq!(
                &out[..4],
                &[0x80, 3, 0, 1],
                "control, version 3, SYN_STREAM"
            );
            let len = u32::from_be_bytes([0, out[5], out[6], out[7]]) as usize;
            assert_eq!(out.len(), 8 + len);
            assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), id);
            assert_eq!(
                headers(&mut inflate, &out[18..]),
                vec![("streamtype".to_string(), kind.to_string())]
            );
        }
    }

    #[test]
    fn frames_round_trip_and_partial_frames_wait() {
        let mut out = BytesMut::new();
        data(&mut out, 5, true, b"hello");
        ping(&mut out, 7);
        reset(&mut out, 3, CANCEL);
        // A SYN_REPLY as spdystream writes it: stream id and an (unread) header block.
        control(&mut out, SYN_REPLY, FLAG_FIN, 8);
        out.put_u32(9);
        out.put_u32(0xdead_beef);
        control(&mut out, 9, 0, 8); // WINDOW_UPDATE
        out.put_u64(1);
        let all = out.clone();
        let mut partial = BytesMut::from(&all[..10]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        assert_eq!(partial.len(), 10, "nothing consumed");
        let mut buf = all;
        let mut frames = Vec::new();
        while let Some(f) = decode(&mut buf).unwrap() {
            frames.push(f);
        }
        assert_eq!(
            frames,
            vec![
                Frame::Data {
                    stream: 5,
                    fin: true,
                    data: Bytes::from_static(b"hello")
                },
                Frame::Ping(7),
                Frame::Reset {
                    stream: 3,
                    status: CANCEL
                },
                Frame::SynReply {
                    stream: 9,
                    fin: true
                },
                Frame::Ignored,
            ]
        );
    }

    #[test]
    fn oversized_and_foreign_frames_are_errors() {
        let mut out = BytesMut::new();
        out.put_u32(1);
        out.put_u32((MAX_FRAME + 1) as u32);
        let e = decode(&mut out).unwrap_err();
        assert!(format!("{e}").contains("at most"), "{e}");
        let mut out = BytesMut::new();
        out.put_u16(0x8002);
        out.put_u16(PING);
        out.put_u32(4);
        out.put_u32(1);
        let e = decode(&mut out).unwrap_err();
        assert!(format!("{e}").contains("version 2"), "{e}");
        let mut out = BytesMut::new();
        control(&mut out, RST_STREAM, 0, 2);
        out.put_u16(0);
        let e = decode(&mut out).unwrap_err();
        assert!(format!("{e}").contains("at least 8"), "{e}");
    }
}
