//! WeChat's message signatures and AES-256-CBC message encryption, as the
//! official `WXBizMsgCrypt` libraries do them.
//!
//! - `signature` = SHA-1 (hex) of `[token, timestamp, nonce]` sorted and
//!   joined; `msg_signature` adds the ciphertext to the list.
//! - The AES key is Base64(EncodingAESKey + "="), 32 bytes; the IV is its
//!   first 16 bytes.
//! - Plaintext = 16 random bytes ‖ 4-byte big-endian length ‖ message ‖
//!   receive id (the AppID, or WeCom's CorpID), padded PKCS#7-style to a
//!   multiple of 32 bytes.

use crate::ChannelError;
use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use sha1::{Digest, Sha1};

const PAD_BLOCK: usize = 32;
/// The largest ciphertext accepted (Base64 characters): WeChat's messages
/// are a few kilobytes.
pub const MAX_CIPHERTEXT: usize = 64 * 1024;

/// SHA-1 (lower-case hex) of `parts` sorted and concatenated.
pub fn signature(parts: &[&str]) -> String {
    let mut v: Vec<&str> = parts.to_vec();
    v.sort_unstable();
    let mut h = Sha1::new();
    for p in v {
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare two signatures in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// An account's message key, from its 43-character EncodingAESKey.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn from_encoding_aes_key(s: &str) -> Result<Self, String> {
        if s.len() != 43 {
            return Err("an EncodingAESKey is 43 characters".into());
        }
        // 43 characters hold 258 bits: the last two are not part of the
        // key, and WeChat's keys do not zero them.
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let bytes = lenient
            .decode(format!("{s}="))
            .map_err(|e| format!("the EncodingAESKey is not Base64: {e}"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "the EncodingAESKey does not decode to 32 bytes".to_string())?;
        Ok(Key(key))
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&self.0[..16]);
        iv
    }

    /// Encrypt `msg` for `receive_id` with the 16 bytes `random` in front;
    /// Base64.
    pub fn encrypt_with(&self, random: &[u8; 16], msg: &str, receive_id: &str) -> String {
        let mut buf = Vec::with_capacity(20 + msg.len() + receive_id.len() + PAD_BLOCK);
        buf.extend_from_slice(random);
        buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        buf.extend_from_slice(msg.as_bytes());
        buf.extend_from_slice(receive_id.as_bytes());
        let pad = PAD_BLOCK - buf.len() % PAD_BLOCK;
        buf.resize(buf.len() + pad, pad as u8);
        let n = buf.len();
        let enc = cbc::Encryptor::<aes::Aes256>::new(&self.0.into(), &self.iv().into());
        // The length is a multiple of the block size: this cannot fail.
        let out = enc
            .encrypt_padded_mut::<NoPadding>(&mut buf, n)
            .map(|c| c.to_vec())
            .unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Encrypt `msg` for `receive_id` with fresh random bytes.
    pub fn encrypt(&self, msg: &str, receive_id: &str) -> String {
        let random: [u8; 16] = rand::random();
        self.encrypt_with(&random, msg, receive_id)
    }

    /// Decrypt a Base64 ciphertext; the message, after checking that it
    /// was made for `receive_id`.
    pub fn decrypt(&self, b64: &str, receive_id: &str) -> Result<String, ChannelError> {
        let bad = |m: &str| ChannelError::BadRequest(format!("ciphertext: {m}"));
        if b64.len() > MAX_CIPHERTEXT {
            return Err(bad("too long"));
        }
        let mut buf = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad("not Base64"))?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(bad("not a whole number of AES blocks"));
        }
        let dec = cbc::Decryptor::<aes::Aes256>::new(&self.0.into(), &self.iv().into());
        let plain = dec
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| bad("not a whole number of AES blocks"))?;
        let pad = *plain.last().ok_or_else(|| bad("empty"))? as usize;
        if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
            return Err(bad("bad padding"));
        }
        let body = &plain[..plain.len() - pad];
        if plain[plain.len() - pad..]
            .iter()
            .any(|&b| b as usize != pad)
        {
            return Err(bad("bad padding"));
        }
        if body.len() < 20 {
            return Err(bad("too short"));
        }
        let len = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
        let rest = &body[20..];
        if len > rest.len() {
            return Err(bad("the length field runs past the end"));
        }
        let (msg, id) = rest.split_at(len);
        if !same(&String::from_utf8_lossy(id), receive_id) {
            return Err(ChannelError::Forbidden(
                "the ciphertext was made for another app id".into(),
            ));
        }
        String::from_utf8(msg.to_vec()).map_err(|_| bad("the message is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example in Tencent's WXBizMsgCrypt samples: this key, app id and
    // random string give this ciphertext for "我是中文abcd123".
    const EAK: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const APP: &str = "wxb11529c136998cb6";
    const CIPHER: &str =
        "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg==";

    #[test]
    fn official_example_encrypts_and_decrypts() {
        let k = Key::from_encoding_aes_key(EAK).unwrap();
        assert_eq!(
            k.encrypt_with(b"aaaabbbbccccdddd", "我是中文abcd123", APP),
            CIPHER
        );
        assert_eq!(k.decrypt(CIPHER, APP).unwrap(), "我是中文abcd123");
    }

    #[test]
    fn wrong_app_id_is_refused() {
        let k = Key::from_encoding_aes_key(EAK).unwrap();
        assert!(matches!(
            k.decrypt(CIPHER, "wx0000000000000000"),
            Err(ChannelError::Forbidden(_))
        ));
    }

    #[test]
    fn bad_ciphertexts_are_errors_not_panics() {
        let k = Key::from_encoding_aes_key(EAK).unwrap();
        for c in ["", "!!!", "AAAA", &"A".repeat(MAX_CIPHERTEXT + 4)] {
            assert!(k.decrypt(c, APP).is_err(), "{c:.20}");
        }
        // A valid block with bad padding: flip the last byte of the plaintext
        // by flipping the previous ciphertext block's byte.
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(CIPHER)
            .unwrap();
        let n = raw.len();
        raw[n - 17] ^= 0x40;
        let c = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(matches!(
            k.decrypt(&c, APP),
            Err(ChannelError::BadRequest(_))
        ));
        // Every random ciphertext of a few blocks: never a panic.
        for seed in 0u8..200 {
            let raw: Vec<u8> = (0..64)
                .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                .collect();
            let c = base64::engine::general_purpose::STANDARD.encode(&raw);
            let _ = k.decrypt(&c, APP);
        }
    }

    #[test]
    fn round_trip_with_random_bytes() {
        let k = Key::from_encoding_aes_key(EAK).unwrap();
        for len in [0, 1, 11, 12, 31, 32, 33, 1000] {
            let m = "字".repeat(len);
            assert_eq!(k.decrypt(&k.encrypt(&m, APP), APP).unwrap(), m);
        }
    }

    #[test]
    fn signatures_sort_their_parts() {
        // sha1("1409304348" + "pamtest" + "xxxxxx"), computed with Python's hashlib.
        assert_eq!(
            signature(&["pamtest", "1409304348", "xxxxxx"]),
            signature(&["xxxxxx", "pamtest", "1409304348"])
        );
        assert_eq!(signature(&["pamtest", "1409304348", "xxxxxx"]), SIG_PAMTEST);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    const SIG_PAMTEST: &str = "76480565cbe296026c53aaacd1ad523a1ddba24f";

    #[test]
    fn bad_keys_are_refused() {
        assert!(Key::from_encoding_aes_key("short").is_err());
        assert!(Key::from_encoding_aes_key(&"!".repeat(43)).is_err());
    }
}
