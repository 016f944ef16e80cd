//! The gateway ⇄ worker protocol: small, versioned, length-framed.
//!
//! A frame is a big-endian `u32` length followed by that many bytes: a version byte, a
//! kind byte, then the kind's fields. Strings and byte strings are a `u32` length and the
//! bytes; lists a `u16` count. A key's [`KeyBinding`] travels as three strings and is parsed
//! back into its types on decoding, so a malformed binding is refused at the boundary. A
//! connection carries one exchange at a time: the gateway sends one request frame; the
//! worker answers `Pong` (to `Ping`), `Head` + `Chunk`* + `End` (to `Call`), `End` (to
//! `OpenOnly`), `Sealed` (to `Rewrap`), or `Fail` (possibly after `Head` and some chunks,
//! when the provider's stream breaks).
//!
//! The decoder is the worker's trust boundary after the peer-credential check, so it
//! never panics, never allocates more than the frame it was given, and refuses trailing
//! bytes, unknown kinds and unknown versions.

use std::fmt;

use keyward_core::{KeyBinding, KeyId, KeyOwner, Provider};

/// 2: typed bindings, and `OpenOnly` with a message of its own.
pub const VERSION: u8 = 2;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// A provider call for a worker: the sealed key, what it is bound to, and the HTTP
/// request to make with it (everything but the key).
#[derive(Clone, PartialEq, Eq)]
pub struct CallRequest {
    pub request_id: u64,
    pub binding: KeyBinding,
    pub blob: Vec<u8>,
    pub method: Method,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// How long the provider may take to start answering, and may pause between chunks.
    pub timeout_ms: u32,
}

impl fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallRequest")
            .field("request_id", &self.request_id)
            .field("provider", &self.binding.provider)
            .field("path_and_query", &self.path_and_query)
            .field("blob_len", &self.blob.len())
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A re-wrap for a worker: open the blob (bound to account, provider, key id) with
/// whichever KEK version it names and seal it again to `target_kek_id`. The answer is
/// `Sealed` with the new blob, or `Fail`. Nothing but blobs crosses the socket.
#[derive(Clone, PartialEq, Eq)]
pub struct RewrapRequest {
    pub request_id: u64,
    pub binding: KeyBinding,
    pub blob: Vec<u8>,
    pub target_kek_id: String,
}

impl fmt::Debug for RewrapRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RewrapRequest")
            .field("request_id", &self.request_id)
            .field("provider", &self.binding.provider)
            .field("blob_len", &self.blob.len())
            .field("target_kek_id", &self.target_kek_id)
            .finish_non_exhaustive()
    }
}

/// Open a blob and wipe it without calling anyone: the readiness check of the KEK backend,
/// and the round trip the benchmarks measure. Answered `End` or `Fail`.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub request_id: u64,
    pub binding: KeyBinding,
    pub blob: Vec<u8>,
}

impl fmt::Debug for OpenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenRequest")
            .field("request_id", &self.request_id)
            .field("owner", &self.binding.owner)
            .field("blob_len", &self.blob.len())
            .finish_non_exhaustive()
    }
}

/// Gateway → worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    Ping,
    /// Open the blob and call the provider.
    Call(CallRequest),
    /// Open the blob and wipe it without calling anyone.
    OpenOnly(OpenRequest),
    /// Move a blob to another KEK version (`keyward kek rewrap`).
    Rewrap(RewrapRequest),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    BadRequest,
    OpenFailed,
    PathRefused,
    Connect,
    Timeout,
    Io,
    UpstreamProtocol,
    Internal,
    /// The KEK backend (HSM, KMS) is unreachable or refusing: nothing opened, retry later.
    KekUnavailable,
}

impl FailKind {
    fn code(self) -> u8 {
        match self {
            FailKind::BadRequest => 1,
            FailKind::OpenFailed => 2,
            FailKind::PathRefused => 3,
            FailKind::Connect => 4,
            FailKind::Timeout => 5,
            FailKind::Io => 6,
            FailKind::UpstreamProtocol => 7,
            FailKind::Internal => 8,
            FailKind::KekUnavailable => 9,
        }
    }
    fn from_code(c: u8) -> Option<FailKind> {
        Some(match c {
            1 => FailKind::BadRequest,
            2 => FailKind::OpenFailed,
            3 => FailKind::PathRefused,
            4 => FailKind::Connect,
            5 => FailKind::Timeout,
            6 => FailKind::Io,
            7 => FailKind::UpstreamProtocol,
            8 => FailKind::Internal,
            9 => FailKind::KekUnavailable,
            _ => return None,
        })
    }
}

/// Worker → gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    Pong,
    Head {
        status: u16,
        headers: Vec<(String, String)>,
    },
    Chunk(Vec<u8>),
    End,
    Fail {
        kind: FailKind,
        message: String,
    },
    /// The answer to `Rewrap`: the blob sealed to the target KEK version.
    Sealed(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame too large")]
    TooLarge,
    #[error("frame truncated")]
    Truncated,
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

// ---- encoding -------------------------------------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8) -> Writer {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(&[0, 0, 0, 0, VERSION, kind]);
        Writer(v)
    }
    fn u8(&mut self, n: u8) {
        self.0.push(n);
    }
    fn u16(&mut self, n: u16) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn u64(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn pairs(&mut self, pairs: &[(String, String)]) {
        self.u16(u16::try_from(pairs.len()).unwrap_or(u16::MAX));
        for (k, v) in pairs.iter().take(usize::from(u16::MAX)) {
            self.str(k);
            self.str(v);
        }
    }
    /// The finished frame, length prefix filled in.
    fn finish(mut self) -> Result<Vec<u8>, ProtocolError> {
        let len = self.0.len() - 4;
        if len > MAX_FRAME {
            return Err(ProtocolError::TooLarge);
        }
        let prefix = u32::try_from(len).map_err(|_| ProtocolError::TooLarge)?.to_be_bytes();
        if let Some(head) = self.0.get_mut(..4) {
            head.copy_from_slice(&prefix);
        }
        Ok(self.0)
    }
}

const K_PING: u8 = 1;
const K_CALL: u8 = 2;
const K_OPEN_ONLY: u8 = 3;
const K_REWRAP: u8 = 4;
const K_PONG: u8 = 10;
const K_HEAD: u8 = 11;
const K_CHUNK: u8 = 12;
const K_END: u8 = 13;
const K_FAIL: u8 = 14;
const K_SEALED: u8 = 15;

fn write_binding(w: &mut Writer, b: &KeyBinding) {
    w.str(b.owner.as_str());
    w.str(b.provider.as_str());
    w.str(b.key_id.as_str());
}

fn write_call(w: &mut Writer, c: &CallRequest) {
    w.u64(c.request_id);
    write_binding(w, &c.binding);
    w.bytes(&c.blob);
    w.u8(match c.method {
        Method::Get => 1,
        Method::Post => 2,
    });
    w.str(&c.path_and_query);
    w.pairs(&c.headers);
    w.bytes(&c.body);
    w.u32(c.timeout_ms);
}

impl ToWorker {
    /// The frame, with its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        match self {
            ToWorker::Ping => Writer::new(K_PING).finish(),
            ToWorker::Call(c) => {
                let mut w = Writer::new(K_CALL);
                write_call(&mut w, c);
                w.finish()
            }
            ToWorker::OpenOnly(o) => {
                let mut w = Writer::new(K_OPEN_ONLY);
                w.u64(o.request_id);
                write_binding(&mut w, &o.binding);
                w.bytes(&o.blob);
                w.finish()
            }
            ToWorker::Rewrap(r) => {
                let mut w = Writer::new(K_REWRAP);
                w.u64(r.request_id);
                write_binding(&mut w, &r.binding);
                w.bytes(&r.blob);
                w.str(&r.target_kek_id);
                w.finish()
            }
        }
    }

    /// Decodes a frame body (without its length prefix).
    pub fn decode(frame: &[u8]) -> Result<ToWorker, ProtocolError> {
        let mut r = Reader::new(frame)?;
        let msg = match r.kind {
            K_PING => ToWorker::Ping,
            K_CALL => ToWorker::Call(read_call(&mut r)?),
            K_OPEN_ONLY => ToWorker::OpenOnly(OpenRequest {
                request_id: r.u64()?,
                binding: read_binding(&mut r)?,
                blob: r.bytes()?.to_vec(),
            }),
            K_REWRAP => ToWorker::Rewrap(RewrapRequest {
                request_id: r.u64()?,
                binding: read_binding(&mut r)?,
                blob: r.bytes()?.to_vec(),
                target_kek_id: r.string()?,
            }),
            k => return Err(ProtocolError::Kind(k)),
        };
        r.end()?;
        Ok(msg)
    }
}

impl FromWorker {
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        match self {
            FromWorker::Pong => Writer::new(K_PONG).finish(),
            FromWorker::Head { status, headers } => {
                let mut w = Writer::new(K_HEAD);
                w.u16(*status);
                w.pairs(headers);
                w.finish()
            }
            FromWorker::Chunk(b) => {
                let mut w = Writer::new(K_CHUNK);
                w.bytes(b);
                w.finish()
            }
            FromWorker::End => Writer::new(K_END).finish(),
            FromWorker::Fail { kind, message } => {
                let mut w = Writer::new(K_FAIL);
                w.u8(kind.code());
                w.str(message);
                w.finish()
            }
            FromWorker::Sealed(b) => {
                let mut w = Writer::new(K_SEALED);
                w.bytes(b);
                w.finish()
            }
        }
    }

    pub fn decode(frame: &[u8]) -> Result<FromWorker, ProtocolError> {
        let mut r = Reader::new(frame)?;
        let msg = match r.kind {
            K_PONG => FromWorker::Pong,
            K_HEAD => FromWorker::Head {
                status: r.u16()?,
                headers: r.pairs()?,
            },
            K_CHUNK => FromWorker::Chunk(r.bytes()?.to_vec()),
            K_SEALED => FromWorker::Sealed(r.bytes()?.to_vec()),
            K_END => FromWorker::End,
            K_FAIL => {
                let kind = FailKind::from_code(r.u8()?).ok_or(ProtocolError::Malformed("fail kind"))?;
                FromWorker::Fail {
                    kind,
                    message: r.string()?,
                }
            }
            k => return Err(ProtocolError::Kind(k)),
        };
        r.end()?;
        Ok(msg)
    }
}

// ---- decoding -------------------------------------------------------------------------

struct Reader<'a> {
    rest: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn new(frame: &'a [u8]) -> Result<Reader<'a>, ProtocolError> {
        if frame.len() > MAX_FRAME {
            return Err(ProtocolError::TooLarge);
        }
        let (&version, rest) = frame.split_first().ok_or(ProtocolError::Truncated)?;
        if version != VERSION {
            return Err(ProtocolError::Version(version));
        }
        let (&kind, rest) = rest.split_first().ok_or(ProtocolError::Truncated)?;
        Ok(Reader { rest, kind })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        self.take(N)?.try_into().map_err(|_| ProtocolError::Truncated)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(u8::from_be_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = usize::try_from(self.u32()?).map_err(|_| ProtocolError::TooLarge)?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::Malformed("string is not UTF-8"))
    }
    fn pairs(&mut self) -> Result<Vec<(String, String)>, ProtocolError> {
        let n = self.u16()?;
        // Each pair needs at least 8 bytes: refuse counts the frame cannot hold before allocating.
        if usize::from(n) * 8 > self.rest.len() {
            return Err(ProtocolError::Truncated);
        }
        let mut out = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            out.push((self.string()?, self.string()?));
        }
        Ok(out)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("trailing bytes"))
        }
    }
}

fn read_binding(r: &mut Reader<'_>) -> Result<KeyBinding, ProtocolError> {
    let owner = KeyOwner::parse(&r.string()?).map_err(|_| ProtocolError::Malformed("key owner"))?;
    let provider: Provider = r.string()?.parse().map_err(|_| ProtocolError::Malformed("provider"))?;
    let key_id = KeyId::parse(&r.string()?).map_err(|_| ProtocolError::Malformed("key id"))?;
    Ok(KeyBinding {
        owner,
        provider,
        key_id,
    })
}

fn read_call(r: &mut Reader<'_>) -> Result<CallRequest, ProtocolError> {
    Ok(CallRequest {
        request_id: r.u64()?,
        binding: read_binding(r)?,
        blob: r.bytes()?.to_vec(),
        method: match r.u8()? {
            1 => Method::Get,
            2 => Method::Post,
            _ => return Err(ProtocolError::Malformed("method")),
        },
        path_and_query: r.string()?,
        headers: r.pairs()?,
        body: r.bytes()?.to_vec(),
        timeout_ms: r.u32()?,
    })
}

/// Reads one frame body from `io` (length prefix first). `Ok(None)` at a clean EOF
/// between frames.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<()>, FrameIoError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameIoError::Io(e)),
    }
    let len = usize::try_from(u32::from_be_bytes(len)).map_err(|_| FrameIoError::Protocol(ProtocolError::TooLarge))?;
    if len > MAX_FRAME {
        return Err(FrameIoError::Protocol(ProtocolError::TooLarge));
    }
    buf.clear();
    buf.resize(len, 0);
    io.read_exact(buf).await.map_err(FrameIoError::Io)?;
    Ok(Some(()))
}

#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("protocol: {0}")]
    Protocol(ProtocolError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn binding(provider: Provider) -> KeyBinding {
        KeyBinding {
            owner: KeyOwner::Account(keyward_core::AccountId::from_random([1; 16])),
            provider,
            key_id: KeyId::from_random([2; 16]),
        }
    }

    fn call() -> CallRequest {
        CallRequest {
            request_id: 7,
            binding: binding(Provider::OpenAi),
            blob: vec![1, 2, 3],
            method: Method::Post,
            path_and_query: "/v1/chat/completions".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{}".to_vec(),
            timeout_ms: 1000,
        }
    }

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    fn open() -> OpenRequest {
        OpenRequest {
            request_id: 8,
            binding: KeyBinding {
                owner: KeyOwner::ReadinessCanary,
                ..binding(Provider::Anthropic)
            },
            blob: vec![9, 9],
        }
    }

    fn rewrap() -> RewrapRequest {
        RewrapRequest {
            request_id: 9,
            binding: KeyBinding {
                owner: KeyOwner::SharedPool,
                ..binding(Provider::Google)
            },
            blob: vec![4, 5, 6],
            target_kek_id: "local-2".into(),
        }
    }

    #[test]
    fn rewrap_frames_round_trip_refuse_truncation_and_hide_the_blob() {
        let f = ToWorker::Rewrap(rewrap()).encode().unwrap();
        assert_eq!(ToWorker::decode(body(&f)).unwrap(), ToWorker::Rewrap(rewrap()));
        for cut in 0..body(&f).len() {
            assert!(ToWorker::decode(&body(&f)[..cut]).is_err(), "cut at {cut}");
        }
        let s = FromWorker::Sealed(vec![7, 8]).encode().unwrap();
        assert_eq!(FromWorker::decode(body(&s)).unwrap(), FromWorker::Sealed(vec![7, 8]));
        let d = format!("{:?}", rewrap());
        assert!(d.contains("blob_len: 3") && !d.contains("[4, 5, 6]"), "{d}");
    }

    #[test]
    fn round_trips() {
        for m in [ToWorker::Ping, ToWorker::Call(call()), ToWorker::OpenOnly(open())] {
            let f = m.encode().unwrap();
            assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
            assert_eq!(ToWorker::decode(body(&f)).unwrap(), m);
        }
        for m in [
            FromWorker::Pong,
            FromWorker::Head {
                status: 200,
                headers: vec![("x-request-id".into(), "r".into())],
            },
            FromWorker::Chunk(b"data: x\n\n".to_vec()),
            FromWorker::End,
            FromWorker::Fail {
                kind: FailKind::Timeout,
                message: "slow".into(),
            },
        ] {
            let f = m.encode().unwrap();
            assert_eq!(FromWorker::decode(body(&f)).unwrap(), m);
        }
    }

    #[test]
    fn every_fail_kind_crosses_the_socket_as_itself() {
        let kinds = [
            FailKind::BadRequest,
            FailKind::OpenFailed,
            FailKind::PathRefused,
            FailKind::Connect,
            FailKind::Timeout,
            FailKind::Io,
            FailKind::UpstreamProtocol,
            FailKind::Internal,
            FailKind::KekUnavailable,
        ];
        for kind in kinds {
            let m = FromWorker::Fail {
                kind,
                message: "m".into(),
            };
            assert_eq!(FromWorker::decode(body(&m.encode().unwrap())).unwrap(), m);
        }
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len(), "distinct wire codes");
        assert_eq!(FailKind::from_code(0), None);
        assert_eq!(FailKind::from_code(10), None);
    }

    #[test]
    fn refuses_versions_kinds_truncation_and_trailing_bytes() {
        let f = ToWorker::Call(call()).encode().unwrap();
        let b = body(&f);
        let mut v = b.to_vec();
        v[0] = 1;
        assert_eq!(ToWorker::decode(&v), Err(ProtocolError::Version(1)));
        let mut v = b.to_vec();
        v[1] = 99;
        assert_eq!(ToWorker::decode(&v), Err(ProtocolError::Kind(99)));
        for cut in 0..b.len() {
            assert!(ToWorker::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = b.to_vec();
        v.push(0);
        assert_eq!(ToWorker::decode(&v), Err(ProtocolError::Malformed("trailing bytes")));
        // A worker frame is not a gateway frame.
        assert!(ToWorker::decode(body(&FromWorker::End.encode().unwrap())).is_err());
    }

    #[test]
    fn a_malformed_binding_is_refused_at_the_boundary() {
        // The owner, provider and key id are the frame's first strings after the request id.
        let good = ToWorker::Rewrap(rewrap()).encode().unwrap();
        for (from, to) in [
            (&b"platform"[..], &b"platfork"[..]),
            (&b"google"[..], &b"gooble"[..]),
            (&b"key_"[..], &b"kex_"[..]),
        ] {
            let mut v = body(&good).to_vec();
            let at = v.windows(from.len()).position(|w| w == from).unwrap();
            v[at..at + to.len()].copy_from_slice(to);
            assert!(
                matches!(ToWorker::decode(&v), Err(ProtocolError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(to)
            );
        }
    }

    #[test]
    fn debug_hides_the_blob_and_body() {
        let s = format!("{:?}", call());
        assert!(s.contains("blob_len: 3") && !s.contains("[1, 2, 3]"), "{s}");
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ToWorker::decode(&bytes);
            let _ = FromWorker::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_mutated_frames(pos in 0usize..200, val in any::<u8>()) {
            let f = ToWorker::Call(call()).encode().unwrap();
            let mut v = body(&f).to_vec();
            let i = pos % v.len();
            v[i] = val;
            let _ = ToWorker::decode(&v);
        }
    }

    fn arb_rewrap() -> impl Strategy<Value = RewrapRequest> {
        (
            any::<u64>(),
            any::<[u8; 16]>(),
            0usize..3,
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 0..1024),
            ".{0,64}",
        )
            .prop_map(
                |(request_id, owner, provider, key, blob, target_kek_id)| RewrapRequest {
                    request_id,
                    binding: KeyBinding {
                        owner: if owner[0] % 2 == 0 {
                            KeyOwner::Account(keyward_core::AccountId::from_random(owner))
                        } else {
                            KeyOwner::SharedPool
                        },
                        provider: Provider::ALL[provider],
                        key_id: KeyId::from_random(key),
                    },
                    blob,
                    target_kek_id,
                },
            )
    }

    proptest! {
        /// Any `Rewrap` request survives encode/decode unchanged, its length prefix is the
        /// body's length, and every strict prefix of its body is refused.
        #[test]
        fn rewrap_round_trips(r in arb_rewrap()) {
            let m = ToWorker::Rewrap(r);
            let f = m.encode().unwrap();
            prop_assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
            prop_assert_eq!(ToWorker::decode(body(&f)).unwrap(), m);
            // Not a worker frame either.
            prop_assert!(FromWorker::decode(body(&f)).is_err());
            let b = body(&f);
            for cut in [0, 1, 2, b.len() / 2, b.len() - 1] {
                prop_assert!(ToWorker::decode(&b[..cut]).is_err(), "cut at {}", cut);
            }
            let mut longer = b.to_vec();
            longer.push(0);
            prop_assert!(ToWorker::decode(&longer).is_err());
        }

        /// Any `Sealed` answer survives encode/decode unchanged (an empty blob included), and
        /// truncation or a trailing byte is refused.
        #[test]
        fn sealed_round_trips(blob in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let m = FromWorker::Sealed(blob);
            let f = m.encode().unwrap();
            prop_assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
            prop_assert_eq!(FromWorker::decode(body(&f)).unwrap(), m);
            prop_assert!(ToWorker::decode(body(&f)).is_err());
            let b = body(&f);
            for cut in 0..b.len().min(8) {
                prop_assert!(FromWorker::decode(&b[..cut]).is_err(), "cut at {}", cut);
            }
            let mut longer = b.to_vec();
            longer.push(0);
            prop_assert!(FromWorker::decode(&longer).is_err());
        }

        /// Arbitrary bytes behind a valid `Rewrap` or `Sealed` header (version and kind)
        /// never panic either decoder.
        #[test]
        fn rewrap_and_sealed_headers_with_arbitrary_bodies_never_panic(
            sealed in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let f = if sealed {
                FromWorker::Sealed(Vec::new()).encode().unwrap()
            } else {
                ToWorker::Rewrap(rewrap()).encode().unwrap()
            };
            let mut v = body(&f)[..2].to_vec();
            v.extend_from_slice(&rest);
            let _ = ToWorker::decode(&v);
            let _ = FromWorker::decode(&v);
        }

        /// A `Rewrap` or `Sealed` frame with one byte changed never panics the decoder.
        #[test]
        fn mutated_rewrap_and_sealed_frames_never_panic(
            r in arb_rewrap(),
            at in any::<prop::sample::Index>(),
            val in any::<u8>(),
        ) {
            let f = ToWorker::Rewrap(r.clone()).encode().unwrap();
            let mut v = body(&f).to_vec();
            let i = at.index(v.len());
            v[i] = val;
            let _ = ToWorker::decode(&v);
            let s = FromWorker::Sealed(r.blob).encode().unwrap();
            let mut v = body(&s).to_vec();
            let i = at.index(v.len());
            v[i] = val;
            let _ = FromWorker::decode(&v);
        }
    }
}
