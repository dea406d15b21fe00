//! Agora RTC tokens: AccessToken2 ("007"), built and signed locally (no
//! request to Agora). ADR 0017.
//!
//! A token is `"007"` followed by standard padded base64 of
//! `zlib(string(signature) ‖ signing_info)`, where
//!
//! ```text
//! signing_info = string(app_id) ‖ u32 issue_ts ‖ u32 expire ‖ u32 salt ‖ u16 1 ‖ rtc
//! rtc          = u16 1 ‖ map(privilege → expire) ‖ string(channel) ‖ string(uid)
//! key          = HMAC-SHA256(u32(salt), HMAC-SHA256(u32(issue_ts), app_certificate))
//! signature    = HMAC-SHA256(key, signing_info)
//! ```
//!
//! (little-endian; `string` = u16 length ‖ bytes; `map` = u16 count ‖
//! (u16 key ‖ u32 value) by ascending key). Every expiry is **relative**:
//! seconds after `issue_ts`. The old system passed absolute timestamps
//! there and minted tokens valid for about 56 years (SPEC §6 item 11); here
//! each expiry is at most [`MAX_EXPIRES_IN`] and the decoder in the tests
//! checks it.
//!
//! What a token allows is decided by the server (the calls feature): the
//! caller passes an [`RtcTokenRequest`]; [`rtc_token`] refuses uid 0 (which
//! Agora reads as "any uid may join"), channel names Agora would refuse, and
//! expiries outside `1 s ..= 2 h`.
//!
//! The zlib stream comes from flate2's `zlib-rs` backend at level 6, which
//! reproduces Agora's two official golden strings byte for byte (the
//! default `miniz_oxide` backend does not); Agora inflates whatever it gets,
//! so other tokens are checked by decoding ([`decode`]). ADR 0017.

mod decode;
pub mod notify;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

pub use decode::{DecodedRtc, DecodedToken, decode};

/// The version prefix of every AccessToken2.
pub const VERSION: &str = "007";

/// The longest any expiry may be, relative to the issue time: the join
/// privilege lasts the funded time plus a short grace, at most 2 h (SPEC
/// §3 "Calls"). Agora's own limit is 24 h per privilege.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(2 * 60 * 60);

/// The longest grace after the funded time that [`RtcTokenRequest::for_call`]
/// accepts (reference §2.2: "funded seconds + grace (≤ 3 min)").
pub const MAX_GRACE: Duration = Duration::from_secs(3 * 60);

/// Agora's longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 64;

/// The RTC service's type in a token.
pub(crate) const SERVICE_RTC: u16 = 1;

/// RTC privileges (Agora's numbering).
pub mod privilege {
    pub const JOIN_CHANNEL: u16 = 1;
    pub const PUBLISH_AUDIO_STREAM: u16 = 2;
    pub const PUBLISH_VIDEO_STREAM: u16 = 3;
    pub const PUBLISH_DATA_STREAM: u16 = 4;
}

/// Salts are drawn uniformly from `1..=SALT_MAX` (as Agora's own builders do).
pub const SALT_MAX: u32 = 99_999_999;

/// zlib level 6 (zlib's default, and what Agora's Python and Node builders
/// use). The level is also written into the zlib header (`78 9c`).
const ZLIB_LEVEL: u32 = 6;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgoraError {
    #[error("AGORA_APP_ID must be 32 hexadecimal characters")]
    AppId,
    #[error("AGORA_APP_CERTIFICATE must be 32 hexadecimal characters")]
    AppCertificate,
    #[error(
        "uid 0 lets any user join the channel: a server-assigned uid 1..=4294967295 is required"
    )]
    UidZero,
    #[error("invalid channel name: {0}")]
    Channel(&'static str),
    #[error("{what} must be from 1 s to {max} s after issue, not {secs} s", max = MAX_EXPIRES_IN.as_secs())]
    Expiry { what: &'static str, secs: u64 },
    #[error("the publish privileges cannot outlast the join privilege ({publish} s > {join} s)")]
    PublishOutlastsJoin { publish: u64, join: u64 },
    #[error("a subscriber gets no publish privileges (publish_expires_in must be 0)")]
    SubscriberPublishes,
    #[error("the grace after the funded time is at most {max} s, not {secs} s", max = MAX_GRACE.as_secs())]
    Grace { secs: u64 },
    #[error("the issue time {0} is outside what a token can carry (1970..2106, u32 seconds)")]
    IssueTime(i64),
    #[error("salt {0} is outside 1..=99999999")]
    Salt(u32),
    #[error("the system random generator failed: {0}")]
    Random(String),
    #[error("cannot encode the token: {0}")]
    Encode(String),
    #[error("not an AccessToken2: {0}")]
    Decode(&'static str),
}

/// The project's App ID (public: it is in every token) and App Certificate
/// (secret: it signs them). Both 32 hexadecimal characters, used exactly as
/// given (the certificate's bytes are the HMAC's input, so its case counts).
#[derive(Clone)]
pub struct AgoraCredentials {
    app_id: String,
    app_certificate: SecretString,
}

impl std::fmt::Debug for AgoraCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgoraCredentials")
            .field("app_id", &self.app_id)
            .field("app_certificate", &"[REDACTED]")
            .finish()
    }
}

/// Agora's check on both the App ID and the certificate.
pub fn is_hex32(value: &str) -> bool {
    value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

impl AgoraCredentials {
    /// Checks both values (the error never echoes them).
    pub fn new(app_id: &str, app_certificate: SecretString) -> Result<Self, AgoraError> {
        if !is_hex32(app_id) {
            return Err(AgoraError::AppId);
        }
        if !is_hex32(app_certificate.expose_secret()) {
            return Err(AgoraError::AppCertificate);
        }
        Ok(AgoraCredentials {
            app_id: app_id.to_owned(),
            app_certificate,
        })
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    pub(crate) fn certificate(&self) -> &SecretString {
        &self.app_certificate
    }
}

/// What the user may do in the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtcRole {
    /// Join and publish audio, video and data: the two parties of a call.
    Publisher,
    /// Join only. Agora enforces the difference only once co-host
    /// authentication is enabled on the project.
    Subscriber,
}

/// One RTC token, as the server decides it. Expiries are relative to the
/// issue time and counted in whole seconds (a fraction is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcTokenRequest<'a> {
    /// The call's own channel (see [`validate_channel`]).
    pub channel: &'a str,
    /// The server-assigned uid; never 0.
    pub uid: u32,
    pub role: RtcRole,
    /// How long the user may stay in the channel; also the token's own
    /// expiry (no privilege can outlast it). `1 s ..= 2 h`.
    pub join_expires_in: Duration,
    /// How long a publisher may publish audio, video and data:
    /// `1 s ..= join_expires_in`. Zero for a subscriber.
    pub publish_expires_in: Duration,
}

impl<'a> RtcTokenRequest<'a> {
    /// A call party's token: publisher, staying (and publishing) for the
    /// funded time plus `grace` (at most [`MAX_GRACE`]), never more than
    /// [`MAX_EXPIRES_IN`] (funding beyond that is covered by a later
    /// re-issue; shorter is always safe). Re-issued after each successful
    /// top-up of the call's escrow, so a client that stops paying is dropped
    /// by Agora itself when its join privilege runs out.
    ///
    /// `funded_for` is `funded_until − now`, both from the database's clock.
    pub fn for_call(
        channel: &'a str,
        uid: u32,
        funded_for: Duration,
        grace: Duration,
    ) -> Result<Self, AgoraError> {
        if grace > MAX_GRACE {
            return Err(AgoraError::Grace {
                secs: grace.as_secs(),
            });
        }
        let stay = funded_for.saturating_add(grace).min(MAX_EXPIRES_IN);
        Ok(RtcTokenRequest {
            channel,
            uid,
            role: RtcRole::Publisher,
            join_expires_in: stay,
            publish_expires_in: stay,
        })
    }
}

/// Where salts come from: the OS generator in production
/// ([`OsRandomSalt`]), a fixed value in the golden tests.
pub trait SaltSource {
    /// A salt in `1..=SALT_MAX`.
    fn next_salt(&mut self) -> Result<u32, AgoraError>;
}

/// Salts from the operating system's CSPRNG, uniform over `1..=SALT_MAX`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandomSalt;

impl SaltSource for OsRandomSalt {
    fn next_salt(&mut self) -> Result<u32, AgoraError> {
        // The largest multiple of SALT_MAX that fits in a u32: values at or
        // above it are redrawn so every salt is equally likely.
        const LIMIT: u32 = (u32::MAX / SALT_MAX) * SALT_MAX;
        loop {
            let r = getrandom::u32().map_err(|e| AgoraError::Random(e.to_string()))?;
            if r < LIMIT {
                return Ok(r % SALT_MAX + 1);
            }
        }
    }
}

/// An RTC token for `request`, issued at `now` (the project's
/// `Clock::now()`), salted from the OS generator.
pub fn rtc_token(
    credentials: &AgoraCredentials,
    request: &RtcTokenRequest<'_>,
    now: DateTime<Utc>,
) -> Result<String, AgoraError> {
    rtc_token_with(credentials, request, now, &mut OsRandomSalt)
}

/// [`rtc_token`] with the salt taken from `salt`.
pub fn rtc_token_with(
    credentials: &AgoraCredentials,
    request: &RtcTokenRequest<'_>,
    now: DateTime<Utc>,
    salt: &mut dyn SaltSource,
) -> Result<String, AgoraError> {
    if request.uid == 0 {
        return Err(AgoraError::UidZero);
    }
    validate_channel(request.channel)?;
    let join = expiry_secs("join_expires_in", request.join_expires_in)?;
    let mut privileges = BTreeMap::from([(privilege::JOIN_CHANNEL, join)]);
    match request.role {
        RtcRole::Publisher => {
            let publish = expiry_secs("publish_expires_in", request.publish_expires_in)?;
            if publish > join {
                return Err(AgoraError::PublishOutlastsJoin {
                    publish: u64::from(publish),
                    join: u64::from(join),
                });
            }
            privileges.insert(privilege::PUBLISH_AUDIO_STREAM, publish);
            privileges.insert(privilege::PUBLISH_VIDEO_STREAM, publish);
            privileges.insert(privilege::PUBLISH_DATA_STREAM, publish);
        }
        RtcRole::Subscriber => {
            if request.publish_expires_in.as_secs() != 0 {
                return Err(AgoraError::SubscriberPublishes);
            }
        }
    }
    let issue_ts = issue_ts(now)?;
    let salt = salt.next_salt()?;
    if !(1..=SALT_MAX).contains(&salt) {
        return Err(AgoraError::Salt(salt));
    }
    let uid = request.uid.to_string();
    AccessToken {
        app_id: &credentials.app_id,
        issue_ts,
        expire: join,
        salt,
        rtc: RtcService {
            privileges: &privileges,
            channel: request.channel,
            uid: &uid,
        },
    }
    .build(credentials.certificate())
}

/// Agora's rules for a channel name: 1 to 64 bytes of `a-z A-Z 0-9`, space,
/// and `! # $ % & ( ) + - : ; < = . > ? @ [ ] ^ _ { } | ~ ,`.
pub fn validate_channel(channel: &str) -> Result<(), AgoraError> {
    if channel.is_empty() {
        return Err(AgoraError::Channel("it is empty"));
    }
    if channel.len() > MAX_CHANNEL_LEN {
        return Err(AgoraError::Channel("it is longer than 64 bytes"));
    }
    const PUNCTUATION: &[u8] = b"!#$%&()+-:;<=.>?@[]^_{}|~, ";
    if channel
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || PUNCTUATION.contains(&b))
    {
        Ok(())
    } else {
        Err(AgoraError::Channel(
            "only a-z A-Z 0-9, space and !#$%&()+-:;<=.>?@[]^_{}|~, are allowed",
        ))
    }
}

/// Whole seconds in `1..=MAX_EXPIRES_IN`.
fn expiry_secs(what: &'static str, d: Duration) -> Result<u32, AgoraError> {
    let secs = d.as_secs();
    if secs == 0 || secs > MAX_EXPIRES_IN.as_secs() {
        return Err(AgoraError::Expiry { what, secs });
    }
    u32::try_from(secs).map_err(|_| AgoraError::Expiry { what, secs })
}

/// `now` as the token's u32 seconds, leaving room for the longest expiry
/// (Agora adds the relative expiries to it).
fn issue_ts(now: DateTime<Utc>) -> Result<u32, AgoraError> {
    let secs = now.timestamp();
    let max = u64::from(u32::MAX) - MAX_EXPIRES_IN.as_secs();
    u32::try_from(secs)
        .ok()
        .filter(|s| u64::from(*s) <= max)
        .ok_or(AgoraError::IssueTime(secs))
}

/// The RTC service of a token. `uid` is the decimal uid ("" for uid 0 in
/// Agora's own builders; only the golden vectors use that here).
pub(crate) struct RtcService<'a> {
    pub privileges: &'a BTreeMap<u16, u32>,
    pub channel: &'a str,
    pub uid: &'a str,
}

/// Every field of a token with one RTC service, unchecked: [`rtc_token`]
/// validates first; the golden tests build Agora's vectors (uid 0
/// included) through this directly.
pub(crate) struct AccessToken<'a> {
    pub app_id: &'a str,
    pub issue_ts: u32,
    pub expire: u32,
    pub salt: u32,
    pub rtc: RtcService<'a>,
}

impl AccessToken<'_> {
    pub(crate) fn signing_info(&self) -> Result<Vec<u8>, AgoraError> {
        let mut out = Vec::with_capacity(128);
        put_string(&mut out, self.app_id.as_bytes())?;
        out.extend_from_slice(&self.issue_ts.to_le_bytes());
        out.extend_from_slice(&self.expire.to_le_bytes());
        out.extend_from_slice(&self.salt.to_le_bytes());
        // One service.
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&SERVICE_RTC.to_le_bytes());
        let count = u16::try_from(self.rtc.privileges.len())
            .map_err(|_| AgoraError::Encode("too many privileges".to_owned()))?;
        out.extend_from_slice(&count.to_le_bytes());
        // A BTreeMap iterates by ascending key, as the format requires.
        for (privilege, expire) in self.rtc.privileges {
            out.extend_from_slice(&privilege.to_le_bytes());
            out.extend_from_slice(&expire.to_le_bytes());
        }
        put_string(&mut out, self.rtc.channel.as_bytes())?;
        put_string(&mut out, self.rtc.uid.as_bytes())?;
        Ok(out)
    }

    /// The uncompressed token body: `string(signature) ‖ signing_info`.
    pub(crate) fn payload(&self, certificate: &SecretString) -> Result<Vec<u8>, AgoraError> {
        let signing_info = self.signing_info()?;
        let mut mac = signing_mac(certificate, self.issue_ts, self.salt)?;
        mac.update(&signing_info);
        let signature = mac.finalize().into_bytes();
        let mut out = Vec::with_capacity(2 + signature.len() + signing_info.len());
        put_string(&mut out, &signature)?;
        out.extend_from_slice(&signing_info);
        Ok(out)
    }

    pub(crate) fn build(&self, certificate: &SecretString) -> Result<String, AgoraError> {
        use base64::Engine as _;
        let payload = self.payload(certificate)?;
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(payload.len()),
            flate2::Compression::new(ZLIB_LEVEL),
        );
        z.write_all(&payload)
            .map_err(|e| AgoraError::Encode(e.to_string()))?;
        let compressed = z.finish().map_err(|e| AgoraError::Encode(e.to_string()))?;
        let mut token = String::from(VERSION);
        base64::engine::general_purpose::STANDARD.encode_string(compressed, &mut token);
        Ok(token)
    }
}

/// The key chain: a MAC keyed with
/// `HMAC(u32(salt), HMAC(u32(issue_ts), certificate))`, ready for
/// `signing_info`.
pub(crate) fn signing_mac(
    certificate: &SecretString,
    issue_ts: u32,
    salt: u32,
) -> Result<HmacSha256, AgoraError> {
    // HMAC accepts keys of any length; the error cannot happen.
    let key =
        |k: &[u8]| HmacSha256::new_from_slice(k).map_err(|e| AgoraError::Encode(e.to_string()));
    let mut k1 = key(&issue_ts.to_le_bytes())?;
    k1.update(certificate.expose_secret().as_bytes());
    let mut k2 = key(&salt.to_le_bytes())?;
    k2.update(&k1.finalize().into_bytes());
    key(&k2.finalize().into_bytes())
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), AgoraError> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| AgoraError::Encode("a string is longer than 65535 bytes".to_owned()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}
