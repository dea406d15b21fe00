//! Agora's channel-event notifications (NCS, reference §1.5): the
//! `Agora-Signature-V2` header is the hex HMAC-SHA256 of the raw body with
//! the project's notification secret; there is no timestamp, so receivers
//! deduplicate on `noticeId`. Only the fields Stagepass reads are parsed.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

/// The header carrying the HMAC-SHA256 signature.
pub const SIGNATURE_HEADER: &str = "agora-signature-v2";

/// Why a notification was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoticeError {
    #[error("no Agora-Signature-V2 header")]
    Missing,
    #[error("the signature is not 64 hexadecimal characters")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
    #[error("the body is not an Agora notification: {0}")]
    Body(String),
}

/// Checks `signature` (hex, either case) against the HMAC-SHA256 of `body`
/// under `secret`, in constant time.
pub fn verify(
    body: &[u8],
    signature: Option<&str>,
    secret: &SecretString,
) -> Result<(), NoticeError> {
    let signature = signature.ok_or(NoticeError::Missing)?.trim();
    let expected = decode_hex(signature).ok_or(NoticeError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .map_err(|_| NoticeError::Mismatch)?;
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| NoticeError::Mismatch)
}

/// The hex HMAC-SHA256 of `body` (what Agora sends; for tests and tools).
pub fn sign(body: &[u8], secret: &SecretString) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *out.get_mut(i)? = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// A notification, as far as Stagepass reads it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    /// Unique per event; Agora resends the same one on retries.
    pub notice_id: String,
    /// 1 = RTC.
    pub product_id: i64,
    /// 103/104 host join/leave, 105/106 audience, 107/108 communication.
    pub event_type: i64,
    #[serde(default)]
    pub payload: NoticePayload,
}

/// The channel event itself.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NoticePayload {
    pub channel_name: Option<String>,
    pub uid: Option<i64>,
    /// Increases per user's client: older events are stale.
    pub client_seq: Option<i64>,
    /// Leave events: 1 quit, 2 timeout, 3 banned, 5 new device, 12 token
    /// error or expiry, 999 abnormal.
    pub reason: Option<i64>,
}

/// Parses a verified body.
pub fn parse(body: &[u8]) -> Result<Notice, NoticeError> {
    let notice: Notice =
        serde_json::from_slice(body).map_err(|e| NoticeError::Body(e.to_string()))?;
    if notice.notice_id.is_empty() || notice.notice_id.chars().count() > 200 {
        return Err(NoticeError::Body(
            "noticeId must be 1–200 characters".into(),
        ));
    }
    Ok(notice)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret() -> SecretString {
        "ncs-secret-for-tests-0123456789".to_owned().into()
    }

    #[test]
    fn a_signed_body_verifies_and_any_change_does_not() {
        let body = br#"{"noticeId":"n1","productId":1,"eventType":104,"payload":{"channelName":"c","uid":7,"clientSeq":3,"reason":2}}"#;
        let sig = sign(body, &secret());
        assert_eq!(sig.len(), 64);
        assert_eq!(verify(body, Some(&sig), &secret()), Ok(()));
        assert_eq!(verify(body, Some(&sig.to_uppercase()), &secret()), Ok(()));
        let mut tampered = body.to_vec();
        tampered[20] ^= 1;
        assert_eq!(
            verify(&tampered, Some(&sig), &secret()),
            Err(NoticeError::Mismatch)
        );
        let other: SecretString = "another-secret-0123456789abcdef".to_owned().into();
        assert_eq!(verify(body, Some(&sig), &other), Err(NoticeError::Mismatch));
        assert_eq!(verify(body, None, &secret()), Err(NoticeError::Missing));
        assert_eq!(
            verify(body, Some("abc"), &secret()),
            Err(NoticeError::Malformed)
        );
        assert_eq!(
            verify(body, Some(&"zz".repeat(32)), &secret()),
            Err(NoticeError::Malformed)
        );
        let notice = parse(body).unwrap();
        assert_eq!(notice.event_type, 104);
        assert_eq!(notice.payload.reason, Some(2));
        assert_eq!(notice.payload.uid, Some(7));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_raw_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key: SecretString = "Jefe".to_owned().into();
        assert_eq!(
            sign(b"what do ya want for nothing?", &key),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
