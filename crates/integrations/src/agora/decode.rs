//! Reading an AccessToken2 back: `"007"` + base64 → zlib → fields, and the
//! signature checked with the certificate. The tests verify every token the
//! builder makes this way (the compressed bytes are not canonical, the
//! fields and the signature are); the calls feature can use it to assert
//! what a client was handed.

use std::collections::BTreeMap;
use std::io::Read as _;

use hmac::Mac as _;
use secrecy::SecretString;

use super::{AgoraError, SERVICE_RTC, VERSION, signing_mac};

/// Larger than any token with one RTC service (about 140 to 300 bytes
/// inflated); a bound so a hostile string cannot inflate without limit.
const MAX_INFLATED: u64 = 16 * 1024;

/// Every field of a token with one RTC service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedToken {
    pub signature: Vec<u8>,
    pub app_id: String,
    /// Unix seconds.
    pub issue_ts: u32,
    /// Seconds after `issue_ts` during which the token can be used.
    pub expire: u32,
    pub salt: u32,
    pub rtc: DecodedRtc,
    /// The signed bytes, exactly as found.
    signing_info: Vec<u8>,
}

/// The RTC service of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRtc {
    /// Privilege → seconds after `issue_ts`.
    pub privileges: BTreeMap<u16, u32>,
    pub channel: String,
    /// The uid as written: decimal, or "" for uid 0.
    pub uid: String,
}

impl DecodedToken {
    /// Whether `certificate` signed this token (constant-time comparison).
    pub fn verify(&self, certificate: &SecretString) -> bool {
        match signing_mac(certificate, self.issue_ts, self.salt) {
            Ok(mut mac) => {
                mac.update(&self.signing_info);
                mac.verify_slice(&self.signature).is_ok()
            }
            Err(_) => false,
        }
    }

    /// The inflated token body (`string(signature) ‖ signing_info`), for
    /// comparing with Agora's reference payloads.
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.signature.len() + self.signing_info.len());
        // Both lengths were read from u16 fields.
        let len = u16::try_from(self.signature.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.signing_info);
        out
    }

    /// The uid as a number: `None` for "" (uid 0, any user) or an account.
    pub fn uid(&self) -> Option<u32> {
        self.rtc.uid.parse().ok().filter(|uid| *uid != 0)
    }
}

/// Parses a token. The signature is not checked here: see
/// [`DecodedToken::verify`].
pub fn decode(token: &str) -> Result<DecodedToken, AgoraError> {
    use base64::Engine as _;
    let body = token
        .strip_prefix(VERSION)
        .ok_or(AgoraError::Decode("it does not start with 007"))?;
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| AgoraError::Decode("the body is not standard padded base64"))?;
    let mut inflated = Vec::new();
    flate2::read::ZlibDecoder::new(compressed.as_slice())
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut inflated)
        .map_err(|_| AgoraError::Decode("the body is not a zlib stream"))?;
    if u64::try_from(inflated.len()).unwrap_or(u64::MAX) > MAX_INFLATED {
        return Err(AgoraError::Decode("the body inflates to more than 16 KiB"));
    }

    let mut r = Reader(&inflated);
    let signature = r.string()?.to_vec();
    if signature.len() != 32 {
        return Err(AgoraError::Decode("the signature is not 32 bytes"));
    }
    let signing_info = r.0.to_vec();
    let app_id = r.utf8()?;
    let issue_ts = r.u32()?;
    let expire = r.u32()?;
    let salt = r.u32()?;
    if r.u16()? != 1 || r.u16()? != SERVICE_RTC {
        return Err(AgoraError::Decode(
            "only tokens with exactly one RTC service are read",
        ));
    }
    let mut privileges = BTreeMap::new();
    let mut last = None;
    for _ in 0..r.u16()? {
        let privilege = r.u16()?;
        if last.is_some_and(|l| l >= privilege) {
            return Err(AgoraError::Decode("privileges are not in ascending order"));
        }
        last = Some(privilege);
        privileges.insert(privilege, r.u32()?);
    }
    let channel = r.utf8()?;
    let uid = r.utf8()?;
    if !r.0.is_empty() {
        return Err(AgoraError::Decode("bytes left after the RTC service"));
    }
    Ok(DecodedToken {
        signature,
        app_id,
        issue_ts,
        expire,
        salt,
        rtc: DecodedRtc {
            privileges,
            channel,
            uid,
        },
        signing_info,
    })
}

/// Little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AgoraError> {
        if self.0.len() < n {
            return Err(AgoraError::Decode("the body ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, AgoraError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, AgoraError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<&'a [u8], AgoraError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn utf8(&mut self) -> Result<String, AgoraError> {
        let bytes = self.string()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| AgoraError::Decode("a string is not UTF-8"))
    }
}
