//! Accepts the HTTP/2 `:authority` that etcd's own Go clients send.
//!
//! etcdctl 3.4 dials a member for per-endpoint calls (`endpoint status`, `defrag`,
//! `move-leader`, `--cluster` variants, ...) with the endpoint URL as the gRPC target,
//! so its requests carry `:authority: http://127.0.0.1:2379`. etcd's grpc-go server
//! ignores the malformed value; hyper's HTTP/2 refuses the stream (PROTOCOL_ERROR),
//! which would make those etcdctl commands fail against Pontoon.
//!
//! [`AuthorityFix`] sits between the TCP stream and the HTTP server and rewrites only
//! that. For an HTTP/2 connection (recognised by its preface) it decodes the first
//! request header block (HPACK). A client uses one authority for a connection, so:
//!
//! - if it is well-formed (every client but etcdctl 3.4's per-member calls), the
//!   block and everything after it pass through untouched: no further parsing;
//! - otherwise every header block of the connection is decoded (with the client's
//!   dynamic table), `scheme://` is stripped from `:authority`, and the block is
//!   re-encoded for the server (with a table that mirrors the server's decoder).
//!
//! Other frames pass through unchanged, and HTTP/1.1 connections (`/health`,
//! `/metrics`) are not touched at all. Malformed input closes the connection, as the
//! server itself would.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE (HTTP/2's default, which hyper keeps).
const MAX_FRAME: usize = 16_384;
/// Largest header block assembled from CONTINUATION frames.
const MAX_HEADER_BLOCK: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Detect,
    /// HTTP/2, deciding on the first header block.
    H2First,
    /// HTTP/2 from a client that sends `scheme://` authorities: rewrite every block.
    H2Rewrite,
    Passthrough,
}

/// A header block being assembled from HEADERS + CONTINUATION frames.
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, passed on unchanged if no rewrite is needed.
    frames: Vec<u8>,
}

pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    raw: BytesMut,
    out: BytesMut,
    eof: bool,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
    pending: Option<Pending>,
}

fn protocol_error(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {why}"))
}

/// `http://host:port/` -> `host:port`; anything else unchanged.
fn fix_authority(v: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(v).ok()?;
    let (_, rest) = s.split_once("://")?;
    Some(rest.trim_end_matches('/').as_bytes().to_vec())
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            mode: Mode::Detect,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
            decoder: fluke_hpack::Decoder::new(),
            encoder: fluke_hpack::Encoder::new(),
            pending: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be processed from `raw` to `out`.
    fn process(&mut self) -> io::Result<()> {
        if self.mode == Mode::Detect {
            let n = self.raw.len().min(PREFACE.len());
            if self.raw[..n] != PREFACE[..n] {
                self.mode = Mode::Passthrough;
            } else if n == PREFACE.len() {
                self.mode = Mode::H2First;
                let preface = self.raw.split_to(n);
                self.out.extend_from_slice(&preface);
            } else {
                return Ok(());
            }
        }
        if self.mode == Mode::Passthrough {
            let all = self.raw.split();
            self.out.extend_from_slice(&all);
            return Ok(());
        }
        while self.raw.len() >= 9 && self.mode != Mode::Passthrough {
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if self.raw.len() < 9 + len {
                break;
            }
            let frame = self.raw.split_to(9 + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[9..];
            match kind {
                FRAME_HEADERS => {
                    if self.pending.is_some() {
                        return Err(protocol_error("HEADERS inside a header block"));
                    }
                    let mut p = payload;
                    let mut pad = 0usize;
                    if flags & FLAG_PADDED != 0 {
                        pad = *p.first().ok_or_else(|| protocol_error("bad padding"))? as usize;
                        p = &p[1..];
                    }
                    let mut priority = None;
                    if flags & FLAG_PRIORITY != 0 {
                        let pr: [u8; 5] = p
                            .get(..5)
                            .and_then(|b| b.try_into().ok())
                            .ok_or_else(|| protocol_error("bad priority"))?;
                        priority = Some(pr);
                        p = &p[5..];
                    }
                    if pad > p.len() {
                        return Err(protocol_error("bad padding"));
                    }
                    let fragment = &p[..p.len() - pad];
                    self.pending = Some(Pending {
                        stream,
                        end_stream: flags & FLAG_END_STREAM != 0,
                        priority,
                        block: fragment.to_vec(),
                        frames: frame.to_vec(),
                    });
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit()?;
                    }
                }
                FRAME_CONTINUATION => {
                    let Some(p) = self.pending.as_mut() else {
                        return Err(protocol_error("CONTINUATION without HEADERS"));
                    };
                    if p.stream != stream || p.block.len() + payload.len() > MAX_HEADER_BLOCK {
                        return Err(protocol_error("bad CONTINUATION"));
                    }
                    p.block.extend_from_slice(payload);
                    p.frames.extend_from_slice(&frame);
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit()?;
                    }
                }
                _ => {
                    if self.pending.is_some() {
                        return Err(protocol_error("frame inside a header block"));
                    }
                    self.out.extend_from_slice(&frame);
                }
            }
        }
        if self.mode == Mode::Passthrough {
            let rest = self.raw.split();
            self.out.extend_from_slice(&rest);
        }
        Ok(())
    }

    /// Re-encodes a complete header block, fixing `:authority`.
    fn emit(&mut self) -> io::Result<()> {
        let p = self.pending.take().expect("a pending header block");
        let headers = self
            .decoder
            .decode(&p.block)
            .map_err(|e| protocol_error(&format!("HPACK: {e:?}")))?;
        if self.mode == Mode::H2First {
            let needs_fix = headers
                .iter()
                .any(|(n, v)| n == b":authority" && fix_authority(v).is_some());
            if !needs_fix {
                // A well-behaved client: nothing on this connection is touched again.
                self.out.extend_from_slice(&p.frames);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.mode = Mode::H2Rewrite;
        }
        let fixed: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(n, v)| match (n.as_slice(), fix_authority(&v)) {
                (b":authority", Some(f)) => (n, f),
                _ => (n, v),
            })
            .collect();
        let encoded = self
            .encoder
            .encode(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut payload = Vec::with_capacity(5 + encoded.len());
        if let Some(pr) = p.priority {
            payload.extend_from_slice(&pr);
        }
        payload.extend_from_slice(&encoded);
        let mut first = true;
        let mut rest = payload.as_slice();
        loop {
            let n = rest.len().min(MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let last = tail.is_empty();
            let (kind, mut flags) = if first {
                let mut f = 0;
                if p.end_stream {
                    f |= FLAG_END_STREAM;
                }
                if p.priority.is_some() {
                    f |= FLAG_PRIORITY;
                }
                (FRAME_HEADERS, f)
            } else {
                (FRAME_CONTINUATION, 0)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let len = (n as u32).to_be_bytes();
            self.out
                .extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.out.extend_from_slice(&p.stream.to_be_bytes());
            self.out.extend_from_slice(chunk);
            if last {
                return Ok(());
            }
            first = false;
            rest = tail;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Passthrough && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                // Whatever is incomplete goes through as is; the server sees the EOF.
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.process()?;
        }
    }
}

delegate_async_write!([S: AsyncWrite + Unpin] AuthorityFix<S>);

delegate_connected!(AuthorityFix);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through the fix and returns what the server would read.
    async fn through(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Decodes the header blocks of the HEADERS frames in `bytes` (after the preface).
    fn header_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = fluke_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if rest[3] == FRAME_HEADERS {
                out.push(d.decode(&rest[9..9 + len]).unwrap());
            }
            rest = &rest[9 + len..];
        }
        out
    }

    #[tokio::test]
    async fn authority_with_a_scheme_is_fixed_and_the_rest_kept() {
        let mut enc = fluke_hpack::Encoder::new();
        let h1: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
            (b":authority", b"http://127.0.0.1:2379"),
            (b"content-type", b"application/grpc"),
        ];
        // The second request reuses the client's dynamic table entries.
        let b1 = enc.encode(h1.clone());
        let b2 = enc.encode(h1.clone());
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &b1));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
                                                                     // The second block split over HEADERS + CONTINUATION.
        input.extend(frame(FRAME_HEADERS, 0, 3, &b2[..2]));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, &b2[2..]));
        let out = through(input).await;
        let blocks = header_blocks(&out);
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            let auth = b.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(auth.1, b"127.0.0.1:2379");
            assert_eq!(b.len(), 5);
        }
        // The DATA frame is untouched.
        assert!(out.windows(5).any(|w| w == b"\0\0\0\0\0"));
    }

    #[tokio::test]
    async fn connections_with_valid_authorities_pass_through_untouched() {
        let mut enc = fluke_hpack::Encoder::new();
        let h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":path", b"/etcdserverpb.KV/Put"),
            (b":authority", b"127.0.0.1:2379"),
        ];
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &{
            let mut p = vec![2u8];
            p.extend(enc.encode(h.clone()));
            p.extend([0, 0]);
            p
        }));
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 3, &enc.encode(h)));
        assert_eq!(through(input.clone()).await, input, "byte for byte");
    }

    #[tokio::test]
    async fn http1_and_valid_authorities_pass_through() {
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(req.clone()).await, req);
        assert_eq!(fix_authority(b"127.0.0.1:2379"), None);
        assert_eq!(fix_authority(b"https://a:1/").unwrap(), b"a:1");
    }

    #[tokio::test]
    async fn malformed_frames_close_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, b"x"));
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        assert!(fix.read_to_end(&mut out).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff],
        ));
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        assert!(fix.read_to_end(&mut out).await.is_err());
    }
}
