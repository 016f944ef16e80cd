//! The opening half of HPKE (RFC 9180) base mode, single shot, for the one suite keyward
//! seals DEKs with: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305.
//!
//! Why not the `hpke` crate, which does the sealing: every AI call opens a key, and the crate
//! spent about 70 of the 100 µs an open took on X25519. Its Diffie-Hellman is
//! x25519-dalek's portable ladder, and it works out the recipient's public key again on
//! every open (a second scalar multiplication). Here the Diffie-Hellman is aws-lc's
//! (assembly using the CPU's wide multiplies; measured at 2.2× dalek's here), and the
//! public key and the constant half of the key schedule are worked out once per KEK.
//!
//! The RFC's own test vector for this suite (A.2.1) and round trips against the `hpke`
//! crate's sealing pin the two to each other.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use hkdf::{Hkdf, HkdfExtract};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::CryptoError;

/// Length of an X25519 key, public or private, and of the encapsulated key.
pub(crate) const X25519_LEN: usize = 32;
/// `suite_id` of the KEM: "KEM" || I2OSP(kem_id = 0x0020, 2).
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x20";
/// `suite_id` of the whole suite: "HPKE" || kem_id || kdf_id (0x0001) || aead_id (0x0003).
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";
/// Length of the key schedule context: mode (1 byte), psk_id_hash and info_hash (32 each).
const KEY_SCHEDULE_CONTEXT_LEN: usize = 1 + 32 + 32;
/// The AEAD's key and nonce lengths (ChaCha20Poly1305).
const AEAD_KEY_LEN: usize = 32;
const AEAD_NONCE_LEN: usize = 12;

/// A KEK private key ready to open HPKE messages sent to it with one fixed `info`.
/// Not `Clone`, no `Debug`: the private key lives in aws-lc's memory, which is wiped when
/// it is freed.
pub(crate) struct HpkeRecipient {
    private: PrivateKey,
    public: [u8; X25519_LEN],
    /// mode_base || psk_id_hash || info_hash: the same for every message with this `info`.
    key_schedule_context: [u8; KEY_SCHEDULE_CONTEXT_LEN],
}

impl HpkeRecipient {
    /// `private` is the raw X25519 private key (as RFC 9180's `SerializePrivateKey` gives it).
    pub(crate) fn new(private: &[u8; X25519_LEN], info: &[u8]) -> Result<Self, CryptoError> {
        let private = PrivateKey::from_private_key(&X25519, private).map_err(|_| CryptoError::OpenFailed)?;
        let public_key = private.compute_public_key().map_err(|_| CryptoError::OpenFailed)?;
        let public: [u8; X25519_LEN] = public_key.as_ref().try_into().map_err(|_| CryptoError::OpenFailed)?;

        let mut key_schedule_context = [0u8; KEY_SCHEDULE_CONTEXT_LEN];
        let (mode, hashes) = key_schedule_context.split_at_mut(1);
        let (psk_id_hash, info_hash) = hashes.split_at_mut(32);
        mode.copy_from_slice(&[0x00]); // mode_base
        psk_id_hash.copy_from_slice(&labeled_extract(&[], HPKE_SUITE_ID, b"psk_id_hash", &[]).0);
        info_hash.copy_from_slice(&labeled_extract(&[], HPKE_SUITE_ID, b"info_hash", info).0);
        Ok(Self {
            private,
            public,
            key_schedule_context,
        })
    }

    /// The recipient's public key (`pkR`).
    pub(crate) fn public_key(&self) -> &[u8; X25519_LEN] {
        &self.public
    }

    /// Opens the first (and only) message of a base-mode context set up by `enc`:
    /// decrypts `ciphertext` in place, checking `tag` over it and `aad`. A failure leaves no
    /// plaintext: a failed decryption zeroes the buffer, an earlier failure never touches
    /// it. Every failure is [`CryptoError::OpenFailed`].
    pub(crate) fn open_in_place(
        &self,
        enc: &[u8; X25519_LEN],
        aad: &[u8],
        ciphertext: &mut [u8],
        tag: &[u8; 16],
    ) -> Result<(), CryptoError> {
        // Decap (RFC 9180 §4.1). aws-lc refuses a peer key that gives the all-zero shared
        // secret (a small-order point), as the RFC requires of X25519.
        let mut dh = Zeroizing::new([0u8; X25519_LEN]);
        agreement::agree(
            &self.private,
            UnparsedPublicKey::new(&X25519, enc),
            CryptoError::OpenFailed,
            |secret| {
                if secret.len() != X25519_LEN {
                    return Err(CryptoError::OpenFailed);
                }
                dh.copy_from_slice(secret);
                Ok(())
            },
        )?;
        let mut kem_context = [0u8; 2 * X25519_LEN];
        let (enc_part, pk_part) = kem_context.split_at_mut(X25519_LEN);
        enc_part.copy_from_slice(enc);
        pk_part.copy_from_slice(&self.public);
        let (mut eae_prk, eae) = labeled_extract(&[], KEM_SUITE_ID, b"eae_prk", dh.as_ref());
        eae_prk.zeroize();
        let mut shared_secret = Zeroizing::new([0u8; 32]);
        labeled_expand(
            &eae,
            KEM_SUITE_ID,
            b"shared_secret",
            &kem_context,
            shared_secret.as_mut(),
        )?;

        // Key schedule (§5.1), base mode: psk = "", so `secret` extracts from "" salted by
        // the shared secret.
        let (mut secret_prk, secret) = labeled_extract(shared_secret.as_ref(), HPKE_SUITE_ID, b"secret", &[]);
        secret_prk.zeroize();
        let mut key = Zeroizing::new([0u8; AEAD_KEY_LEN]);
        labeled_expand(&secret, HPKE_SUITE_ID, b"key", &self.key_schedule_context, key.as_mut())?;
        let mut base_nonce = [0u8; AEAD_NONCE_LEN];
        labeled_expand(
            &secret,
            HPKE_SUITE_ID,
            b"base_nonce",
            &self.key_schedule_context,
            &mut base_nonce,
        )?;

        // Sequence number 0: the nonce is the base nonce itself.
        let cipher = ChaCha20Poly1305::new_from_slice(key.as_ref()).map_err(|_| CryptoError::OpenFailed)?;
        let opened =
            cipher.decrypt_in_place_detached(Nonce::from_slice(&base_nonce), aad, ciphertext, Tag::from_slice(tag));
        if opened.is_err() {
            ciphertext.zeroize();
            return Err(CryptoError::OpenFailed);
        }
        Ok(())
    }
}

/// `LabeledExtract(salt, label, ikm)`: HKDF-Extract over "HPKE-v1" || suite_id || label || ikm.
/// Returns the PRK (for the caller to keep or wipe) and the expander holding it.
fn labeled_extract(
    salt: &[u8],
    suite_id: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> (hkdf::hmac::digest::Output<Sha256>, Hkdf<Sha256>) {
    let mut extract = HkdfExtract::<Sha256>::new(Some(salt));
    for part in [b"HPKE-v1".as_slice(), suite_id, label, ikm] {
        extract.input_ikm(part);
    }
    extract.finalize()
}

/// `LabeledExpand(prk, label, info, L)`: HKDF-Expand with
/// I2OSP(L, 2) || "HPKE-v1" || suite_id || label || info, for `out.len()` bytes.
fn labeled_expand(
    prk: &Hkdf<Sha256>,
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    let len = u16::try_from(out.len())
        .map_err(|_| CryptoError::OpenFailed)?
        .to_be_bytes();
    prk.expand_multi_info(&[&len, b"HPKE-v1", suite_id, label, info], out)
        .map_err(|_| CryptoError::OpenFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::aead::ChaCha20Poly1305 as HpkeChaCha20Poly1305;
    use hpke::kdf::HkdfSha256;
    use hpke::kem::X25519HkdfSha256;
    use hpke::{Deserializable, Kem as _, OpModeS, Serializable};

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let bytes: Vec<u8> = s
            .as_bytes()
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).expect("ascii"), 16).expect("hex"))
            .collect();
        bytes.try_into().expect("length")
    }

    /// RFC 9180, appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
    /// base mode, sequence number 0.
    #[test]
    fn opens_the_rfc_test_vector() {
        let sk_r: [u8; 32] = unhex("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb");
        let pk_r: [u8; 32] = unhex("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a");
        let enc: [u8; 32] = unhex("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a");
        let info: [u8; 20] = unhex("4f6465206f6e2061204772656369616e2055726e");
        let aad: [u8; 7] = unhex("436f756e742d30");
        let ct: [u8; 45] =
            unhex("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28");
        let pt: [u8; 29] = unhex("4265617574792069732074727574682c20747275746820626561757479");

        let recipient = HpkeRecipient::new(&sk_r, &info).expect("key");
        assert_eq!(recipient.public_key(), &pk_r);
        let (body, tag) = ct.split_at(29);
        let mut buf = body.to_vec();
        let tag: [u8; 16] = tag.try_into().expect("tag");
        recipient.open_in_place(&enc, &aad, &mut buf, &tag).expect("opens");
        assert_eq!(buf, pt);

        // One flipped bit anywhere (enc, aad, ciphertext, tag) fails, and wipes the buffer.
        let mut bad_enc = enc;
        *bad_enc.first_mut().expect("byte") ^= 1;
        let mut buf = body.to_vec();
        assert!(recipient.open_in_place(&bad_enc, &aad, &mut buf, &tag).is_err());
        assert!(buf.iter().all(|&b| b == 0));
        let mut buf = body.to_vec();
        assert!(recipient.open_in_place(&enc, b"Count-1", &mut buf, &tag).is_err());
        let mut buf = body.to_vec();
        *buf.last_mut().expect("byte") ^= 0x80;
        assert!(recipient.open_in_place(&enc, &aad, &mut buf, &tag).is_err());
        let mut bad_tag = tag;
        *bad_tag.last_mut().expect("byte") ^= 1;
        let mut buf = body.to_vec();
        assert!(recipient.open_in_place(&enc, &aad, &mut buf, &bad_tag).is_err());
        // Another `info` is another key schedule.
        let other = HpkeRecipient::new(&sk_r, b"keyward dek v1").expect("key");
        let mut buf = body.to_vec();
        assert!(other.open_in_place(&enc, &aad, &mut buf, &tag).is_err());
    }

    /// RFC 9180 §7.1.4: a Diffie-Hellman that gives the all-zero value must fail. The
    /// all-zero public key is such a point (order 1).
    #[test]
    fn refuses_a_small_order_encapsulated_key() {
        let recipient = HpkeRecipient::new(&[7u8; 32], b"info").expect("key");
        let mut buf = vec![1u8; 8];
        let err = recipient.open_in_place(&[0u8; 32], b"", &mut buf, &[0u8; 16]);
        assert!(matches!(err, Err(CryptoError::OpenFailed)));
    }

    /// What the `hpke` crate seals (as `Sealer::seal` does), this opens, for many keys,
    /// infos, aads and lengths; and both derive the same public key.
    #[test]
    fn opens_what_the_hpke_crate_seals() {
        use rand_core::{OsRng, RngCore};
        for round in 0..64usize {
            let (sk, pk) = X25519HkdfSha256::gen_keypair(&mut OsRng);
            let sk_bytes: [u8; 32] = sk.to_bytes().into();
            let info = format!("info {round}");
            let recipient = HpkeRecipient::new(&sk_bytes, info.as_bytes()).expect("key");
            assert_eq!(recipient.public_key().as_slice(), pk.to_bytes().as_slice());

            let mut msg = vec![0u8; round * 3];
            OsRng.fill_bytes(&mut msg);
            let aad = format!("aad {round}");
            let mut sealed = msg.clone();
            let (enc, tag) =
                hpke::single_shot_seal_in_place_detached::<HpkeChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
                    &OpModeS::Base,
                    &pk,
                    info.as_bytes(),
                    &mut sealed,
                    aad.as_bytes(),
                    &mut OsRng,
                )
                .expect("seal");
            let enc: [u8; 32] = enc.to_bytes().into();
            let tag: [u8; 16] = tag.to_bytes().into();
            recipient
                .open_in_place(&enc, aad.as_bytes(), &mut sealed, &tag)
                .expect("opens");
            assert_eq!(sealed, msg);
            // And the hpke crate agrees this is its key pair.
            let back = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&sk_bytes).expect("sk");
            assert_eq!(X25519HkdfSha256::sk_to_pk(&back).to_bytes(), pk.to_bytes());
        }
    }
}
