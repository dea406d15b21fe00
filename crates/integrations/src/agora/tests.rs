//! Agora's golden vectors byte for byte; every other token checked by
//! decoding it (fields, relative expiries, signature).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use secrecy::SecretString;

use super::*;

// The inputs shared by Agora's Go, Python and Node suites (reference §1.2).
const APP_ID: &str = "970CA35de60c44645bbae8a215061b33";
const CERTIFICATE: &str = "5CFd2fd1755d40ecb72977518be15d3b";
const CHANNEL: &str = "7d72365eb983485397e3e3f9d460bdda";
const UID: u32 = 2_882_341_273;
const ISSUE_TS: u32 = 1_111_111;
const SALT: u32 = 1;
const EXPIRE: u32 = 600;

/// Python and Node suites, uid 2882341273, Join = 600.
const GOLDEN_UID: &str = "007eJxTYBBbsMMnKq7p9Hf/HcIX5kce9b518kCiQgSr5Zrp4X1Tu6UUGCzNDZwdjU1TUs0Mkk1MzExMk5ISUy0SjQxNDcwMk4yN3b8IMEQwMTAwMoAwBIL4CgzmKeZGxmamqUmWFsYmFqbGluapxqnGaZYpJmYGSSkpiVwMRhYWRsYmhkbmxgDCaiTj";
/// Python and Node suites, uid 0 (written as ""), Join = 600.
const GOLDEN_UID_0: &str = "007eJxTYLhzZP08Lxa1Pg57+TcXb/3cZ3wi4V6kbpbOog0G2dOYk20UGCzNDZwdjU1TUs0Mkk1MzExMk5ISUy0SjQxNDcwMk4yN3b8IMEQwMTAwMoAwBIL4CgzmKeZGxmamqUmWFsYmFqbGluapxqnGaZYpJmYGSSkpiQwMADacImo=";
/// The first vector inflated (138 bytes).
const GOLDEN_UID_INFLATED: &str = "200016a0b84c5a5e82cbf74fb813d09f59c54bdac9c06120580539ac97578e958b1a2000393730434133356465363063343436343562626165386132313530363162333347f410005802000001000000010001000100010058020000200037643732333635656239383334383533393765336533663964343630626464610a0032383832333431323733";
/// The Publisher role (privileges 1–4 = 600) as Python's zlib writes it;
/// zlib-rs compresses the same payload differently (reference §1.2).
const PYTHON_PUBLISHER: &str = "007eJxTYDhuGCT90E3Yo2+N3efJV5hX1K1MZAqae/Sa8UP9VXvOhfArMFiaGzg7GpumpJoZJJuYmJmYJiUlplokGhmaGpgZJhkbu38RYIhgYmBgZABhRgYWIAbxmcAkM5hkAZMKDOYp5kbGZqapSZYWxiYWpsaW5qnGqcZplikmZgZJKSmJXAxGFhZGxiaGRubGAKizJcs=";

struct FixedSalt(u32);

impl SaltSource for FixedSalt {
    fn next_salt(&mut self) -> Result<u32, AgoraError> {
        Ok(self.0)
    }
}

fn cert(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn credentials() -> AgoraCredentials {
    AgoraCredentials::new(APP_ID, cert(CERTIFICATE)).expect("valid credentials")
}

fn at(ts: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(i64::from(ts), 0)
        .single()
        .expect("in range")
}

fn golden_token(uid: &str, privileges: &BTreeMap<u16, u32>) -> AccessToken<'static> {
    // Leaked so the borrowed fields live as long as the test.
    let uid: &'static str = Box::leak(uid.to_owned().into_boxed_str());
    let privileges: &'static BTreeMap<u16, u32> = Box::leak(Box::new(privileges.clone()));
    AccessToken {
        app_id: APP_ID,
        issue_ts: ISSUE_TS,
        expire: EXPIRE,
        salt: SALT,
        rtc: RtcService {
            privileges,
            channel: CHANNEL,
            uid,
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_two_official_golden_strings_byte_for_byte() {
    let join = BTreeMap::from([(privilege::JOIN_CHANNEL, EXPIRE)]);
    let token = golden_token(&UID.to_string(), &join);
    assert_eq!(
        hex(&token.payload(&cert(CERTIFICATE)).expect("payload")),
        GOLDEN_UID_INFLATED
    );
    assert_eq!(token.build(&cert(CERTIFICATE)).expect("token"), GOLDEN_UID);
    assert_eq!(
        golden_token("", &join)
            .build(&cert(CERTIFICATE))
            .expect("token"),
        GOLDEN_UID_0
    );
}

/// The public builder, given Agora's inputs (a subscriber gets Join only),
/// writes the same string: nothing but the salt and the clock differ in
/// production.
#[test]
fn the_public_builder_reproduces_the_golden_string() {
    let request = RtcTokenRequest {
        channel: CHANNEL,
        uid: UID,
        role: RtcRole::Subscriber,
        join_expires_in: Duration::from_secs(u64::from(EXPIRE)),
        publish_expires_in: Duration::ZERO,
    };
    let token = rtc_token_with(&credentials(), &request, at(ISSUE_TS), &mut FixedSalt(SALT))
        .expect("token");
    assert_eq!(token, GOLDEN_UID);
}

/// Other cases compare the inflated payload: the Publisher vector as
/// Python wrote it inflates to exactly what our builder signs.
#[test]
fn the_publisher_vector_matches_on_the_inflated_payload() {
    let request = RtcTokenRequest {
        channel: CHANNEL,
        uid: UID,
        role: RtcRole::Publisher,
        join_expires_in: Duration::from_secs(600),
        publish_expires_in: Duration::from_secs(600),
    };
    let ours = rtc_token_with(&credentials(), &request, at(ISSUE_TS), &mut FixedSalt(SALT))
        .expect("token");
    let ours = decode(&ours).expect("ours decodes");
    let python = decode(PYTHON_PUBLISHER).expect("Python's decodes");
    assert_eq!(ours.payload(), python.payload());
    assert_eq!(ours, python);
    assert!(python.verify(&cert(CERTIFICATE)));
}

#[test]
fn decoding_the_golden_vectors() {
    let t = decode(GOLDEN_UID).expect("decodes");
    assert_eq!(t.app_id, APP_ID);
    assert_eq!((t.issue_ts, t.expire, t.salt), (ISSUE_TS, EXPIRE, SALT));
    assert_eq!(t.rtc.channel, CHANNEL);
    assert_eq!(t.rtc.uid, "2882341273");
    assert_eq!(t.uid(), Some(UID));
    assert_eq!(
        t.rtc.privileges,
        BTreeMap::from([(privilege::JOIN_CHANNEL, 600)])
    );
    assert_eq!(hex(&t.payload()), GOLDEN_UID_INFLATED);
    assert!(t.verify(&cert(CERTIFICATE)));

    let zero = decode(GOLDEN_UID_0).expect("decodes");
    assert_eq!(zero.rtc.uid, "");
    assert_eq!(zero.uid(), None, "uid 0 means any user");
    assert!(zero.verify(&cert(CERTIFICATE)));
}

#[test]
fn a_wrong_certificate_fails_the_signature() {
    let t = decode(GOLDEN_UID).expect("decodes");
    for wrong in [
        "5CFd2fd1755d40ecb72977518be15d3c",
        // Same hex value, other case: the certificate's bytes are signed.
        "5cfd2fd1755d40ecb72977518be15d3b",
        "00000000000000000000000000000000",
    ] {
        assert!(!t.verify(&cert(wrong)), "{wrong}");
    }
}

/// Change a signed field and re-compress: the signature no longer holds.
#[test]
fn a_tampered_token_fails_the_signature() {
    let request = RtcTokenRequest::for_call(
        "call_0190e0c1a2b34c5d8e9f00112233aabb",
        42,
        Duration::from_secs(120),
        Duration::from_secs(30),
    )
    .expect("request");
    let token = rtc_token(&credentials(), &request, at(1_800_000_000)).expect("token");
    let original = decode(&token).expect("decodes");
    assert!(original.verify(&cert(CERTIFICATE)));
    let payload = original.payload();
    let tamper = |edit: &dyn Fn(&mut Vec<u8>)| {
        use std::io::Write as _;
        let mut p = payload.clone();
        edit(&mut p);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&p).expect("write");
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.encode(z.finish().expect("finish"));
        decode(&format!("007{body}")).expect("still decodes")
    };
    // signature (2 + 32) ‖ string(app_id) (2 + 32) ‖ issue_ts ‖ expire …
    let expire_at = 2 + 32 + 2 + 32 + 4;
    let longer = tamper(&|p| p[expire_at + 1] = p[expire_at + 1].wrapping_add(1));
    assert_eq!(longer.expire, original.expire + 256);
    assert!(!longer.verify(&cert(CERTIFICATE)), "a longer expiry");
    let last = payload.len() - 1;
    let other_uid = tamper(&|p| p[last] = b'3');
    assert_eq!(other_uid.rtc.uid, "43");
    assert!(!other_uid.verify(&cert(CERTIFICATE)), "another uid");
}

#[test]
fn uid_0_is_refused() {
    let request = RtcTokenRequest {
        channel: "call_1",
        uid: 0,
        role: RtcRole::Publisher,
        join_expires_in: Duration::from_secs(60),
        publish_expires_in: Duration::from_secs(60),
    };
    assert_eq!(
        rtc_token(&credentials(), &request, Utc::now()),
        Err(AgoraError::UidZero)
    );
}

#[test]
fn channel_names_follow_agoras_rules() {
    let all_allowed = "azAZ09 !#$%&()+-:;<=.>?@[]^_{}|~,";
    for ok in [
        "call_0190e0c1a2b34c5d8e9f00112233aabb",
        "a",
        all_allowed,
        &"x".repeat(64),
    ] {
        assert_eq!(validate_channel(ok), Ok(()), "{ok:?}");
    }
    for bad in [
        "",
        &"x".repeat(65),
        "call/1",
        "call\\1",
        "call*1",
        "call'1",
        "call\"1",
        "call`1",
        "call\n1",
        "call\t1",
        "café",
        "call\u{0}1",
    ] {
        assert!(
            matches!(validate_channel(bad), Err(AgoraError::Channel(_))),
            "{bad:?}"
        );
        let request = RtcTokenRequest {
            channel: bad,
            uid: 7,
            role: RtcRole::Publisher,
            join_expires_in: Duration::from_secs(60),
            publish_expires_in: Duration::from_secs(60),
        };
        assert!(
            matches!(
                rtc_token(&credentials(), &request, Utc::now()),
                Err(AgoraError::Channel(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn expiries_are_bounded() {
    let request = |role, join: u64, publish: u64| RtcTokenRequest {
        channel: "call_1",
        uid: 7,
        role,
        join_expires_in: Duration::from_secs(join),
        publish_expires_in: Duration::from_secs(publish),
    };
    let issue = |r: RtcTokenRequest<'_>| rtc_token(&credentials(), &r, Utc::now());
    use RtcRole::{Publisher, Subscriber};
    // The edges are accepted.
    for (role, join, publish) in [
        (Publisher, 1, 1),
        (Publisher, 7200, 7200),
        (Publisher, 7200, 1),
        (Subscriber, 1, 0),
        (Subscriber, 7200, 0),
    ] {
        let token = issue(request(role, join, publish)).expect("within bounds");
        let t = decode(&token).expect("decodes");
        assert_eq!(u64::from(t.expire), join);
    }
    // Zero, past 2 h, or the 56-year tokens of the old system (an absolute
    // time passed as an expiry).
    for join in [0, 7201, 86_400, 1_700_007_200] {
        assert_eq!(
            issue(request(Publisher, join, 1)),
            Err(AgoraError::Expiry {
                what: "join_expires_in",
                secs: join
            })
        );
    }
    assert_eq!(
        issue(request(Publisher, 60, 0)),
        Err(AgoraError::Expiry {
            what: "publish_expires_in",
            secs: 0
        })
    );
    assert_eq!(
        issue(request(Publisher, 60, 61)),
        Err(AgoraError::PublishOutlastsJoin {
            publish: 61,
            join: 60
        })
    );
    assert_eq!(
        issue(request(Subscriber, 60, 60)),
        Err(AgoraError::SubscriberPublishes)
    );
    // A fraction of a second is dropped, never rounded up.
    let mut r = request(Publisher, 60, 60);
    r.join_expires_in = Duration::from_millis(60_999);
    let t = decode(&issue(r).expect("token")).expect("decodes");
    assert_eq!(t.expire, 60);
    r.join_expires_in = Duration::from_millis(999);
    assert!(matches!(issue(r), Err(AgoraError::Expiry { secs: 0, .. })));
}

#[test]
fn a_call_party_stays_for_the_funded_time_plus_grace() {
    let r = RtcTokenRequest::for_call("call_1", 9, Duration::from_secs(120), MAX_GRACE)
        .expect("request");
    assert_eq!(r.role, RtcRole::Publisher);
    assert_eq!(r.join_expires_in, Duration::from_secs(300));
    assert_eq!(r.publish_expires_in, Duration::from_secs(300));
    let t = decode(&rtc_token(&credentials(), &r, Utc::now()).expect("token")).expect("decodes");
    assert_eq!(
        t.rtc.privileges,
        BTreeMap::from([(1, 300), (2, 300), (3, 300), (4, 300)])
    );
    assert_eq!(
        RtcTokenRequest::for_call(
            "call_1",
            9,
            Duration::from_secs(120),
            MAX_GRACE + Duration::from_secs(1)
        ),
        Err(AgoraError::Grace { secs: 181 })
    );
    // Funded for longer than 2 h: capped at 2 h (a later top-up re-issues).
    let long = RtcTokenRequest::for_call("call_1", 9, Duration::from_secs(3 * 3600), MAX_GRACE)
        .expect("request");
    assert_eq!(long.join_expires_in, MAX_EXPIRES_IN);
    let t = decode(&rtc_token(&credentials(), &long, Utc::now()).expect("token")).expect("decodes");
    assert_eq!(t.expire, 7200);
    // Nothing funded: the grace alone; no grace either: refused when issued.
    let none =
        RtcTokenRequest::for_call("call_1", 9, Duration::ZERO, Duration::ZERO).expect("request");
    assert!(matches!(
        rtc_token(&credentials(), &none, Utc::now()),
        Err(AgoraError::Expiry { secs: 0, .. })
    ));
}

#[test]
fn the_issue_time_must_fit_the_token() {
    let r = RtcTokenRequest::for_call("call_1", 9, Duration::from_secs(60), Duration::ZERO)
        .expect("request");
    let before_1970 = Utc.timestamp_opt(-1, 0).single().expect("valid");
    assert_eq!(
        rtc_token(&credentials(), &r, before_1970),
        Err(AgoraError::IssueTime(-1))
    );
    let last = u32::MAX - 7200;
    assert!(rtc_token(&credentials(), &r, at(last)).is_ok());
    let too_late = i64::from(last) + 1;
    assert_eq!(
        rtc_token(
            &credentials(),
            &r,
            Utc.timestamp_opt(too_late, 0).single().expect("valid")
        ),
        Err(AgoraError::IssueTime(too_late))
    );
}

#[test]
fn injected_salts_outside_the_range_are_refused() {
    let r = RtcTokenRequest::for_call("call_1", 9, Duration::from_secs(60), Duration::ZERO)
        .expect("request");
    for salt in [0, SALT_MAX + 1, u32::MAX] {
        assert_eq!(
            rtc_token_with(&credentials(), &r, Utc::now(), &mut FixedSalt(salt)),
            Err(AgoraError::Salt(salt))
        );
    }
}

#[test]
fn os_salts_are_in_range_and_vary() {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        let salt = OsRandomSalt.next_salt().expect("salt");
        assert!((1..=SALT_MAX).contains(&salt), "{salt}");
        seen.insert(salt);
    }
    // 1000 uniform draws from 10^8 values: a repeat is ~0.5 % likely, many
    // repeats mean a broken generator.
    assert!(seen.len() >= 990, "{} distinct salts", seen.len());
}

#[test]
fn credentials_are_checked_and_the_certificate_never_printed() {
    let c = credentials();
    let debug = format!("{c:?}");
    assert!(debug.contains(APP_ID), "{debug}");
    assert!(!debug.contains(CERTIFICATE), "{debug}");
    assert!(!debug.to_lowercase().contains("5cfd2fd1"), "{debug}");

    let short = "970CA35de60c44645bbae8a215061b3";
    let not_hex = "970CA35de60c44645bbae8a215061b3g";
    for bad in [short, not_hex, "", "970CA35de60c44645bbae8a215061b333"] {
        assert_eq!(
            AgoraCredentials::new(bad, cert(CERTIFICATE)).map(|_| ()),
            Err(AgoraError::AppId),
            "{bad:?}"
        );
        let e = AgoraCredentials::new(APP_ID, cert(bad)).map(|_| ());
        assert_eq!(e, Err(AgoraError::AppCertificate), "{bad:?}");
        let text = AgoraError::AppCertificate.to_string();
        assert!(bad.is_empty() || !text.contains(bad), "{text}");
    }
}

#[test]
fn garbage_is_not_a_token() {
    for bad in [
        "",
        "006abc",
        "007",
        "007!!!!",
        "007eJxTYBBbsMMn",
        // Valid base64, not zlib.
        "007AAAA",
        // The golden vector cut short.
        &GOLDEN_UID[..GOLDEN_UID.len() - 8],
    ] {
        assert!(matches!(decode(bad), Err(AgoraError::Decode(_))), "{bad:?}");
    }
}

/// splitmix64: a seeded generator for the property loop (reproducible; no
/// dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `lo..=hi` for a test.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.range(0, u64::try_from(items.len()).expect("length") - 1))
            .expect("index")]
    }
}

/// Many random requests: each token decodes to exactly what was asked,
/// with relative expiries, and only its own certificate verifies it.
#[test]
fn every_token_decodes_to_its_request() {
    const ALLOWED: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&()+-:;<=.>?@[]^_{}|~,";
    const HEX: &[u8] = b"0123456789abcdefABCDEF";
    let mut rng = Rng(0x5eed_a60a);
    for i in 0..2_000 {
        let mut hex32 = || {
            (0..32)
                .map(|_| char::from(*rng.pick(HEX)))
                .collect::<String>()
        };
        let app_id = hex32();
        let certificate = hex32();
        let other_certificate = hex32();
        let credentials = AgoraCredentials::new(&app_id, cert(&certificate)).expect("credentials");
        let len = rng.range(1, 64);
        let channel: String = (0..len).map(|_| char::from(*rng.pick(ALLOWED))).collect();
        let uid = u32::try_from(rng.range(1, u64::from(u32::MAX))).expect("u32");
        let role = *rng.pick(&[RtcRole::Publisher, RtcRole::Subscriber]);
        let join = rng.range(1, 7200);
        let publish = match role {
            RtcRole::Publisher => rng.range(1, join),
            RtcRole::Subscriber => 0,
        };
        let issue_ts = u32::try_from(rng.range(0, u64::from(u32::MAX) - 7200)).expect("u32");
        let request = RtcTokenRequest {
            channel: &channel,
            uid,
            role,
            join_expires_in: Duration::from_secs(join),
            publish_expires_in: Duration::from_secs(publish),
        };
        let token = if i % 2 == 0 {
            rtc_token(&credentials, &request, at(issue_ts))
        } else {
            let salt = u32::try_from(rng.range(1, u64::from(SALT_MAX))).expect("u32");
            rtc_token_with(&credentials, &request, at(issue_ts), &mut FixedSalt(salt))
        }
        .expect("token");
        assert!(token.starts_with("007eJ"), "zlib level 6 header: {token}");

        let t = decode(&token).expect("decodes");
        let context = format!("case {i}: {request:?} at {issue_ts}");
        assert_eq!(t.app_id, app_id, "{context}");
        assert_eq!(t.issue_ts, issue_ts, "{context}");
        // Relative: the same number whenever the token is issued.
        assert_eq!(u64::from(t.expire), join, "{context}");
        assert!((1..=SALT_MAX).contains(&t.salt), "{context}");
        let mut expected = BTreeMap::from([(privilege::JOIN_CHANNEL, join)]);
        if role == RtcRole::Publisher {
            for p in [
                privilege::PUBLISH_AUDIO_STREAM,
                privilege::PUBLISH_VIDEO_STREAM,
                privilege::PUBLISH_DATA_STREAM,
            ] {
                expected.insert(p, publish);
            }
        }
        let got: BTreeMap<u16, u64> = t
            .rtc
            .privileges
            .iter()
            .map(|(p, e)| (*p, u64::from(*e)))
            .collect();
        assert_eq!(got, expected, "{context}");
        assert_eq!(t.rtc.channel, channel, "{context}");
        assert_eq!(t.rtc.uid, uid.to_string(), "{context}");
        assert_eq!(t.uid(), Some(uid), "{context}");
        assert!(t.verify(&cert(&certificate)), "{context}");
        assert!(
            certificate == other_certificate || !t.verify(&cert(&other_certificate)),
            "{context}"
        );
    }
}
