//! Blob format v1, the local backend's: [`Sealer`] (the KEK public key: seals, cannot open)
//! and [`Opener`] (the private key). The DEK is wrapped with HPKE; the header and the data
//! part are [`crate::header`]'s.
//!
//! - Every seal draws a fresh random 256-bit DEK and a fresh random nonce from the OS RNG.
//! - The DEK is wrapped with HPKE (RFC 9180) base mode, single shot, suite
//!   DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + ChaCha20Poly1305, to the KEK public key,
//!   with `info = b"keyward dek v1"` and `aad = binding`.

use std::fmt;

use hpke::aead::ChaCha20Poly1305 as HpkeChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeS, Serializable};
use rand_core::OsRng;
use zeroize::Zeroizing;

use crate::header::{self, Draft, DEK_LEN, TAG_LEN};
use crate::hpke_open::HpkeRecipient;
use crate::{Binding, CryptoError, SealedKey, SecretBytes};

type Kem = X25519HkdfSha256;
type KemPublicKey = <Kem as hpke::Kem>::PublicKey;
type KemPrivateKey = <Kem as hpke::Kem>::PrivateKey;

/// The blob format version the local backend writes (and the only one [`Opener`] reads).
pub const BLOB_VERSION: u8 = header::VERSION_LOCAL;
/// HPKE `info` used when wrapping a DEK.
pub const HPKE_INFO: &[u8] = b"keyward dek v1";

/// Length of an HPKE encapsulated key for DHKEM(X25519, HKDF-SHA256).
const ENC_LEN: usize = 32;
/// Length of the v1 fields between header and data part: encapsulated key, wrapped DEK, tag.
const FIELDS_LEN: usize = ENC_LEN + DEK_LEN + TAG_LEN;

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
        let mut draft = Draft::new(BLOB_VERSION, &self.kek_id, FIELDS_LEN, plaintext.len())?;
        let binding_bytes = binding.canonical_bytes();
        let dek = header::fresh_dek();

        // Wrap the DEK to the KEK public key (HPKE base mode, single shot), in a copy of it.
        let mut wrapped = Zeroizing::new(*dek);
        let (enc, hpke_tag) = hpke::single_shot_seal_in_place_detached::<HpkeChaCha20Poly1305, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &self.public,
            HPKE_INFO,
            wrapped.as_mut(),
            &binding_bytes,
            &mut OsRng,
        )
        .map_err(|_| CryptoError::SealFailed)?;
        draft.push(&enc.to_bytes());
        draft.push(wrapped.as_ref());
        draft.push(&hpke_tag.to_bytes());
        Ok(SealedKey::from_bytes(draft.seal_data(
            &dek,
            &binding_bytes,
            plaintext,
        )?))
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
        let h = header::parse_as(blob.as_bytes(), BLOB_VERSION)?;
        if h.kek_id != self.kek_id {
            return Err(CryptoError::KekMismatch {
                expected: self.kek_id.clone(),
                found: h.kek_id.to_owned(),
            });
        }
        let (enc, rest) = h.rest.split_first_chunk::<ENC_LEN>().ok_or(CryptoError::Malformed)?;
        let (wrapped_dek, rest) = rest.split_first_chunk::<DEK_LEN>().ok_or(CryptoError::Malformed)?;
        let (wrapped_tag, rest) = rest.split_first_chunk::<TAG_LEN>().ok_or(CryptoError::Malformed)?;
        let data = header::split_data(rest)?;
        let binding_bytes = binding.canonical_bytes();

        // Unwrap the DEK in place, inside a zeroizing buffer.
        let mut dek = Zeroizing::new(*wrapped_dek);
        self.recipient
            .open_in_place(enc, &binding_bytes, dek.as_mut(), wrapped_tag)?;
        header::open_data(h.bytes, &data, dek.as_ref(), &binding_bytes, out)
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
