//! Envelope encryption: [`Binding`], [`SealedKey`], [`Sealer`] and [`Opener`].
//!
//! The blob layout is documented at the crate root. Parsing never indexes or slices with a
//! position that could be out of range: every step goes through `split_first`,
//! `split_first_chunk` or `split_at_checked`, and every failure is [`CryptoError::Malformed`].

use std::fmt;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use hpke::aead::ChaCha20Poly1305 as HpkeChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeS, Serializable};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::hpke_open::HpkeRecipient;
use crate::{CryptoError, SecretBytes};

type Kem = X25519HkdfSha256;
type KemPublicKey = <Kem as hpke::Kem>::PublicKey;
type KemPrivateKey = <Kem as hpke::Kem>::PrivateKey;

/// Magic bytes at the start of every sealed key blob.
pub const BLOB_MAGIC: [u8; 3] = *b"KWB";
/// The blob format version this build writes (and the only one it reads).
pub const BLOB_VERSION: u8 = 1;
/// HPKE `info` used when wrapping a DEK.
pub const HPKE_INFO: &[u8] = b"keyward dek v1";
/// Longest plaintext [`Sealer::seal`] accepts (and the longest a blob may carry), in bytes.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;

/// Length of a DEK (ChaCha20Poly1305 key), in bytes.
const DEK_LEN: usize = 32;
/// Length of an HPKE encapsulated key for DHKEM(X25519, HKDF-SHA256).
const ENC_LEN: usize = 32;
/// Length of an AEAD tag (both HPKE's ChaCha20Poly1305 and ours).
const TAG_LEN: usize = 16;
/// Length of the HPKE-wrapped DEK: DEK ciphertext and tag.
const WRAPPED_DEK_LEN: usize = DEK_LEN + TAG_LEN;
/// Length of the ChaCha20Poly1305 nonce.
const NONCE_LEN: usize = 12;

/// What a blob is bound to. The AEAD associated data and the HPKE aad both include all three
/// fields, each length-prefixed, so a blob copied to another account, provider or key row
/// fails to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    /// The owning account.
    pub account_id: &'a str,
    /// The provider the key is for (e.g. `anthropic`).
    pub provider: &'a str,
    /// The key row id.
    pub key_id: &'a str,
}

impl Binding<'_> {
    /// The canonical byte encoding: for each of account id, provider, key id in that order,
    /// its length as a big-endian `u64` followed by its UTF-8 bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let fields = [self.account_id, self.provider, self.key_id];
        let len: usize = fields.iter().map(|f| 8 + f.len()).sum();
        let mut out = Vec::with_capacity(len);
        for field in fields {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

/// An opaque sealed-key blob, as stored in the database. `Debug` prints only its length and
/// kek id, never its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey(Vec<u8>);

impl SealedKey {
    /// Wraps bytes read back from storage. No validation here: [`Opener::open`] does it.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The blob bytes, to store.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Consumes the blob, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The id of the KEK this blob was sealed to, parsed from the header. Every known format
    /// version is read whatever features this build has (v1: local; v2: PKCS#11; v3: AWS
    /// KMS; v2 and v3 share the layout of `wrapped.rs`), so a gateway built without a
    /// backend still counts and lists blobs sealed by it. An unknown version is
    /// [`CryptoError::UnsupportedVersion`].
    pub fn kek_id(&self) -> Result<String, CryptoError> {
        match parse_header(&self.0) {
            Ok(h) => Ok(h.kek_id.to_owned()),
            Err(CryptoError::UnsupportedVersion(v)) if crate::wrapped::is_wrapped_version(v) => {
                crate::wrapped::parse(&self.0, v).map(|p| p.kek_id.to_owned())
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SealedKey");
        d.field("len", &self.0.len());
        match self.kek_id() {
            Ok(id) => d.field("kek_id", &id),
            Err(_) => d.field("kek_id", &"<malformed>"),
        };
        d.finish()
    }
}

/// The seal-only half: holds the KEK public key and its id. This is all the gateway ever has.
#[derive(Clone)]
pub struct Sealer {
    kek_id: String,
    public: KemPublicKey,
}

impl Sealer {
    pub(crate) fn new(kek_id: String, public: KemPublicKey) -> Self {
        Self { kek_id, public }
    }

    /// The id of the KEK this sealer seals to (e.g. `local-1`).
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Seals `plaintext` for `binding`: a fresh random DEK and nonce every call.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::PlaintextTooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let kek_id_len = u8::try_from(self.kek_id.len()).map_err(|_| CryptoError::SealFailed)?;
        let binding_bytes = binding.canonical_bytes();

        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        OsRng.fill_bytes(dek.as_mut());
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);

        // Wrap the DEK to the KEK public key (HPKE base mode, single shot), in a copy of it.
        let mut wrapped = Zeroizing::new([0u8; DEK_LEN]);
        wrapped.copy_from_slice(dek.as_ref());
        let (enc, hpke_tag) = hpke::single_shot_seal_in_place_detached::<HpkeChaCha20Poly1305, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &self.public,
            HPKE_INFO,
            wrapped.as_mut(),
            &binding_bytes,
            &mut OsRng,
        )
        .map_err(|_| CryptoError::SealFailed)?;

        // Exact capacity up front: the plaintext is copied in once and encrypted in place, and
        // the vector never reallocates (which would leave a plaintext copy behind).
        let total = header_len(self.kek_id.len()) + ENC_LEN + WRAPPED_DEK_LEN + NONCE_LEN;
        let total = total + plaintext.len() + TAG_LEN;
        let mut blob = Zeroizing::new(Vec::with_capacity(total));
        blob.extend_from_slice(&BLOB_MAGIC);
        blob.push(BLOB_VERSION);
        blob.push(kek_id_len);
        blob.extend_from_slice(self.kek_id.as_bytes());
        let header_end = blob.len();
        let mut aad = Vec::with_capacity(header_end + binding_bytes.len());
        aad.extend_from_slice(&blob);
        aad.extend_from_slice(&binding_bytes);

        blob.extend_from_slice(&enc.to_bytes());
        blob.extend_from_slice(wrapped.as_ref());
        blob.extend_from_slice(&hpke_tag.to_bytes());
        blob.extend_from_slice(&nonce);
        let body_start = blob.len();
        blob.extend_from_slice(plaintext);

        let cipher = ChaCha20Poly1305::new_from_slice(dek.as_ref()).map_err(|_| CryptoError::SealFailed)?;
        let buffer = blob.get_mut(body_start..).ok_or(CryptoError::SealFailed)?;
        // On error `blob` (which may still hold plaintext) is zeroized as it drops.
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buffer)
            .map_err(|_| CryptoError::SealFailed)?;
        blob.extend_from_slice(&tag);
        debug_assert_eq!(blob.len(), total);
        Ok(SealedKey(std::mem::take(&mut *blob)))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

/// The opening half: holds the KEK private key (wiped when freed). Only the worker has one.
/// Not `Clone`; `Debug` is redacted.
pub struct Opener {
    kek_id: String,
    recipient: HpkeRecipient,
    public: KemPublicKey,
}

impl Opener {
    pub(crate) fn new(kek_id: String, private: &KemPrivateKey) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(<[u8; 32]>::from(private.to_bytes()));
        let recipient = HpkeRecipient::new(&bytes, HPKE_INFO)?;
        let public = KemPublicKey::from_bytes(recipient.public_key()).map_err(|_| CryptoError::OpenFailed)?;
        Ok(Self {
            kek_id,
            recipient,
            public,
        })
    }

    /// The public key matching this opener's private key.
    pub(crate) fn public_key(&self) -> KemPublicKey {
        self.public.clone()
    }

    /// A [`Sealer`] for this opener's KEK, derived from the private key (so whatever it
    /// seals, this opener can open).
    pub fn sealer(&self) -> Sealer {
        Sealer::new(self.kek_id.clone(), self.public_key())
    }

    /// The id of the KEK this opener holds (e.g. `local-1`).
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Opens `blob`, which must have been sealed to this opener's KEK for exactly `binding`.
    pub fn open(&self, binding: &Binding, blob: &SealedKey) -> Result<SecretBytes, CryptoError> {
        let mut plaintext = Zeroizing::new(vec![0u8; blob.as_bytes().len()]);
        let n = self.open_into(binding, blob, plaintext.as_mut_slice())?;
        plaintext.truncate(n);
        Ok(SecretBytes::from_zeroizing(plaintext))
    }

    /// Opens `blob` into `out` (decrypting in place there, so the plaintext never exists
    /// anywhere else: the worker passes locked, non-dumpable memory) and returns its length.
    /// On any failure `out` is zeroed.
    pub fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        let bytes = blob.as_bytes();
        let header = parse_header(bytes)?;
        if header.kek_id != self.kek_id {
            return Err(CryptoError::KekMismatch {
                expected: self.kek_id.clone(),
                found: header.kek_id.to_owned(),
            });
        }
        let body = parse_body(header.rest)?;
        let binding_bytes = binding.canonical_bytes();

        // Unwrap the DEK in place, inside a zeroizing buffer.
        let mut dek = Zeroizing::new(*body.wrapped_dek);
        self.recipient
            .open_in_place(body.enc, &binding_bytes, dek.as_mut(), body.wrapped_tag)?;

        let mut aad = Vec::with_capacity(header.header.len() + binding_bytes.len());
        aad.extend_from_slice(header.header);
        aad.extend_from_slice(&binding_bytes);

        let cipher = ChaCha20Poly1305::new_from_slice(dek.as_ref()).map_err(|_| CryptoError::OpenFailed)?;
        let n = body.ciphertext.len();
        let len = out.len();
        let target = out
            .get_mut(..n)
            .ok_or(CryptoError::PlaintextTooLarge { len: n, max: len })?;
        target.copy_from_slice(body.ciphertext);
        let opened =
            cipher.decrypt_in_place_detached(Nonce::from_slice(body.nonce), &aad, target, Tag::from_slice(body.tag));
        if opened.is_err() {
            zeroize::Zeroize::zeroize(target);
            return Err(CryptoError::OpenFailed);
        }
        Ok(n)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("kek_id", &self.kek_id)
            .field("private_key", &"[REDACTED]")
            .finish()
    }
}

/// Length of the header (magic, version, kek id length, kek id) for a kek id of `kek_id_len`.
const fn header_len(kek_id_len: usize) -> usize {
    BLOB_MAGIC.len() + 1 + 1 + kek_id_len
}

/// Whether `id` is a valid kek id: 1 to 255 printable ASCII characters, no spaces.
pub(crate) fn is_valid_kek_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= usize::from(u8::MAX) && id.bytes().all(|b| b.is_ascii_graphic())
}

struct Header<'a> {
    /// The whole header (magic through kek id): part of the data AEAD's associated data.
    header: &'a [u8],
    kek_id: &'a str,
    rest: &'a [u8],
}

fn parse_header(bytes: &[u8]) -> Result<Header<'_>, CryptoError> {
    let (magic, rest) = bytes.split_first_chunk::<3>().ok_or(CryptoError::Malformed)?;
    if *magic != BLOB_MAGIC {
        return Err(CryptoError::Malformed);
    }
    let (&version, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    if version != BLOB_VERSION {
        return Err(CryptoError::UnsupportedVersion(version));
    }
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    let (id, rest) = rest
        .split_at_checked(usize::from(id_len))
        .ok_or(CryptoError::Malformed)?;
    let kek_id = std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)?;
    if !is_valid_kek_id(kek_id) {
        return Err(CryptoError::Malformed);
    }
    let header = bytes.get(..header_len(id.len())).ok_or(CryptoError::Malformed)?;
    Ok(Header { header, kek_id, rest })
}

struct Body<'a> {
    enc: &'a [u8; ENC_LEN],
    wrapped_dek: &'a [u8; DEK_LEN],
    wrapped_tag: &'a [u8; TAG_LEN],
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

fn parse_body(rest: &[u8]) -> Result<Body<'_>, CryptoError> {
    let (enc, rest) = rest.split_first_chunk::<ENC_LEN>().ok_or(CryptoError::Malformed)?;
    let (wrapped_dek, rest) = rest.split_first_chunk::<DEK_LEN>().ok_or(CryptoError::Malformed)?;
    let (wrapped_tag, rest) = rest.split_first_chunk::<TAG_LEN>().ok_or(CryptoError::Malformed)?;
    let (nonce, rest) = rest.split_first_chunk::<NONCE_LEN>().ok_or(CryptoError::Malformed)?;
    let (ciphertext, tag) = rest.split_last_chunk::<TAG_LEN>().ok_or(CryptoError::Malformed)?;
    if ciphertext.len() > MAX_PLAINTEXT_LEN {
        return Err(CryptoError::Malformed);
    }
    Ok(Body {
        enc,
        wrapped_dek,
        wrapped_tag,
        nonce,
        ciphertext,
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_encoding_is_unambiguous() {
        let a = Binding {
            account_id: "ab",
            provider: "c",
            key_id: "",
        };
        let b = Binding {
            account_id: "a",
            provider: "bc",
            key_id: "",
        };
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a.canonical_bytes().len(), 3 * 8 + 3);
    }

    #[test]
    fn kek_id_validation() {
        assert!(is_valid_kek_id("local-1"));
        assert!(!is_valid_kek_id(""));
        assert!(!is_valid_kek_id("a b"));
        assert!(!is_valid_kek_id("é"));
        assert!(!is_valid_kek_id(&"x".repeat(256)));
        assert!(is_valid_kek_id(&"x".repeat(255)));
    }
}
