//! Attack and happy-path tests of token verification, against a local JWKS server.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt as _;
use uuid::Uuid;

use super::testing::{
    TEST_ISSUER, TEST_JWT_SECRET, TestKey, jwks_json, mint_hs256, mint_hs256_claims,
    sign_hs256_raw, standard_claims,
};
use super::*;

// --- a local JWKS endpoint ---------------------------------------------------

#[derive(Clone)]
struct JwksServer {
    url: String,
    jwks: Arc<StdMutex<Value>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    async fn start(jwks: Value) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = JwksServer {
            url: format!("http://{addr}/auth/v1/.well-known/jwks.json"),
            jwks: Arc::new(StdMutex::new(jwks)),
            fetches: Arc::new(AtomicUsize::new(0)),
            down: Arc::new(AtomicBool::new(false)),
        };
        let app = Router::new()
            .route("/auth/v1/.well-known/jwks.json", get(serve_jwks))
            .with_state(server.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        server
    }

    fn set(&self, jwks: Value) {
        *self.jwks.lock().unwrap() = jwks;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

async fn serve_jwks(State(s): State<JwksServer>) -> Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let body = s.jwks.lock().unwrap().clone();
    axum::Json(body).into_response()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn secret(s: &str) -> Option<Secret> {
    Some(Secret::from(s.to_owned()))
}

/// HS256 secret and the server's JWKS.
fn verifier(server: &JwksServer) -> Verifier {
    Verifier::with_parts(
        TEST_ISSUER.into(),
        secret(TEST_JWT_SECRET),
        Some(server.url.clone()),
        client(),
    )
}

fn hs256_only() -> Verifier {
    Verifier::with_parts(TEST_ISSUER.into(), secret(TEST_JWT_SECRET), None, client())
}

fn claims_for(sub: Uuid) -> Value {
    standard_claims(TEST_ISSUER, sub, Some("fan@example.com"), 3600)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hs256(claims: &Value) -> String {
    mint_hs256_claims(TEST_JWT_SECRET, claims)
}

fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// An HS256 signature over arbitrary (possibly non-JSON) parts.
fn hs256_over_parts(secret: &[u8], header: &str, payload: &str) -> String {
    use hmac::Mac as _;
    let message = format!("{header}.{payload}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(message.as_bytes());
    format!(
        "{message}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Replaces the payload of a signed token, keeping header and signature.
fn with_payload(token: &str, payload: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64json(payload), parts[2])
}

// --- happy paths -------------------------------------------------------------

#[tokio::test]
async fn hs256_token_is_accepted_with_its_claims() {
    let sub = Uuid::new_v4();
    let mut c = claims_for(sub);
    c["app_role"] = json!("creator");
    let token = hs256(&c);
    let claims = hs256_only().verify(&token).await.unwrap();
    assert_eq!(claims.sub, sub);
    assert_eq!(claims.email.as_deref(), Some("fan@example.com"));
    assert!(claims.email_verified);
    assert_eq!(claims.app_role.as_deref(), Some("creator"));
    assert_eq!(claims.session_id.as_deref(), c["session_id"].as_str());
    assert_eq!(claims.exp, c["exp"].as_i64().unwrap());
    assert_eq!(claims.raw, c);
}

#[tokio::test]
async fn mint_hs256_helper_produces_a_valid_token() {
    let sub = Uuid::new_v4();
    let token = mint_hs256(TEST_JWT_SECRET, TEST_ISSUER, sub, None, 60);
    let claims = hs256_only().verify(&token).await.unwrap();
    assert_eq!(claims.sub, sub);
    assert_eq!(claims.email, None);
    assert!(!claims.email_verified);
}

#[tokio::test]
async fn email_verified_falls_back_to_top_level_and_defaults_to_false() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    c.as_object_mut().unwrap().remove("user_metadata");
    assert!(!v.verify(&hs256(&c)).await.unwrap().email_verified);
    c["email_verified"] = json!(true);
    assert!(v.verify(&hs256(&c)).await.unwrap().email_verified);
    c["email"] = json!("");
    assert_eq!(v.verify(&hs256(&c)).await.unwrap().email, None);
}

#[tokio::test]
async fn es256_token_is_accepted_via_jwks() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let sub = Uuid::new_v4();
    let claims = verifier(&server)
        .verify(&key.sign(&claims_for(sub)))
        .await
        .unwrap();
    assert_eq!(claims.sub, sub);
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn rs256_token_is_accepted_via_jwks() {
    let key = TestKey::rs256("rsa-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let sub = Uuid::new_v4();
    let claims = verifier(&server)
        .verify(&key.sign(&claims_for(sub)))
        .await
        .unwrap();
    assert_eq!(claims.sub, sub);
}

#[tokio::test]
async fn jwks_is_cached() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let v = verifier(&server);
    for _ in 0..5 {
        v.verify(&key.sign(&claims_for(Uuid::new_v4())))
            .await
            .unwrap();
    }
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn key_rotation_new_kid_is_accepted_after_a_bounded_refetch() {
    let old = TestKey::es256("old");
    let new = TestKey::rs256("new");
    let server = JwksServer::start(jwks_json(&[&old])).await;
    let v = verifier(&server).with_jwks_timing(
        Duration::from_secs(600),
        Duration::from_millis(800),
        Duration::from_millis(50),
    );
    v.verify(&old.sign(&claims_for(Uuid::new_v4())))
        .await
        .unwrap();
    assert_eq!(server.fetches(), 1);

    server.set(jwks_json(&[&old, &new]));
    let token = new.sign(&claims_for(Uuid::new_v4()));
    // Within the refetch interval the new kid is not looked up yet.
    assert_eq!(v.verify(&token).await.unwrap_err(), AuthError::UnknownKey);
    assert_eq!(server.fetches(), 1);

    tokio::time::sleep(Duration::from_millis(900)).await;
    v.verify(&token).await.unwrap();
    assert_eq!(server.fetches(), 2);
    v.verify(&old.sign(&claims_for(Uuid::new_v4())))
        .await
        .unwrap();
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn jwks_down_with_empty_cache_is_unavailable_and_backs_off() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    server.set_down(true);
    let v = verifier(&server);
    let token = key.sign(&claims_for(Uuid::new_v4()));
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        AuthError::JwksUnavailable
    );
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        AuthError::JwksUnavailable
    );
    assert_eq!(server.fetches(), 1, "a failed fetch is not retried at once");

    let api: ApiError = AuthError::JwksUnavailable.into();
    assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.code(), "auth_unavailable");
}

#[tokio::test]
async fn jwks_unreachable_with_empty_cache_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    drop(listener);
    let key = TestKey::es256("ec-1");
    let v = Verifier::with_parts(TEST_ISSUER.into(), None, Some(url), client());
    assert_eq!(
        v.verify(&key.sign(&claims_for(Uuid::new_v4())))
            .await
            .unwrap_err(),
        AuthError::JwksUnavailable
    );
}

#[tokio::test]
async fn jwks_failure_keeps_using_cached_keys() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let v = verifier(&server).with_jwks_timing(
        Duration::from_millis(50),
        Duration::from_millis(50),
        Duration::from_millis(20),
    );
    v.verify(&key.sign(&claims_for(Uuid::new_v4())))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.set_down(true);
    v.verify(&key.sign(&claims_for(Uuid::new_v4())))
        .await
        .unwrap();
    assert_eq!(
        server.fetches(),
        2,
        "the stale set was refetched (and failed)"
    );
}

#[tokio::test]
async fn jwks_keeps_at_most_20_usable_keys_and_skips_unusable_ones() {
    let ec = TestKey::es256("ec");
    let mut keys = vec![
        json!({"kty": "oct", "kid": "oct", "k": URL_SAFE_NO_PAD.encode(b"0123456789abcdef0123456789abcdef")}),
        json!({"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": ec.jwk()["x"], "y": ec.jwk()["y"]}),
        json!({"kty": "EC", "crv": "P-256", "x": ec.jwk()["x"], "y": ec.jwk()["y"]}),
        json!({"kty": "EC", "crv": "P-256", "kid": "wrong-alg", "alg": "RS256", "x": ec.jwk()["x"], "y": ec.jwk()["y"]}),
        json!({"garbage": true}),
    ];
    for i in 0..25 {
        let mut k = ec.jwk();
        k["kid"] = json!(format!("k{i}"));
        keys.push(k);
    }
    let body = serde_json::to_vec(&json!({ "keys": keys })).unwrap();
    let parsed = parse_jwks(&body).unwrap();
    assert_eq!(parsed.len(), MAX_JWKS_KEYS);
    assert!(
        parsed
            .iter()
            .all(|k| k.kid.starts_with('k') && k.alg == Algorithm::ES256)
    );
    assert!(parse_jwks(b"not json").is_err());
    assert!(parse_jwks(b"{}").is_err());
}

// --- attacks -----------------------------------------------------------------

#[tokio::test]
async fn alg_none_is_rejected() {
    let v = hs256_only();
    let payload = b64json(&claims_for(Uuid::new_v4()));
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64json(&json!({"alg": alg, "typ": "JWT"}));
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_eq!(
                v.verify(&token).await.unwrap_err(),
                AuthError::UnsupportedAlgorithm
            );
        }
    }
    let header = b64json(&json!({"typ": "JWT"}));
    assert_eq!(
        v.verify(&format!("{header}.{payload}.c2ln"))
            .await
            .unwrap_err(),
        AuthError::Malformed
    );
}

#[tokio::test]
async fn other_algorithms_are_rejected() {
    let v = hs256_only();
    let claims = claims_for(Uuid::new_v4());
    for alg in ["HS384", "HS512", "PS256", "ES384", "RS512", "EdDSA"] {
        let token = sign_hs256_raw(
            TEST_JWT_SECRET.as_bytes(),
            &json!({"alg": alg, "typ": "JWT"}),
            &claims,
        );
        assert_eq!(
            v.verify(&token).await.unwrap_err(),
            AuthError::UnsupportedAlgorithm,
            "{alg}"
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_rejected() {
    for key in [TestKey::rs256("rsa-1"), TestKey::es256("ec-1")] {
        let server = JwksServer::start(jwks_json(&[&key])).await;
        let claims = claims_for(Uuid::new_v4());
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": key.kid()});
        let jwk_json = serde_json::to_vec(&key.jwk()).unwrap();
        let forged = [
            sign_hs256_raw(key.public_key_pem().as_bytes(), &header, &claims),
            sign_hs256_raw(&jwk_json, &header, &claims),
        ];
        let with_secret = verifier(&server);
        let jwks_only =
            Verifier::with_parts(TEST_ISSUER.into(), None, Some(server.url.clone()), client());
        for token in &forged {
            assert_eq!(
                with_secret.verify(token).await.unwrap_err(),
                AuthError::BadSignature
            );
            assert_eq!(
                jwks_only.verify(token).await.unwrap_err(),
                AuthError::UnsupportedAlgorithm
            );
        }
        // The forgeries never even caused a JWKS lookup.
        assert_eq!(server.fetches(), 0);
    }
}

#[tokio::test]
async fn jwks_symmetric_keys_are_never_used() {
    let k = b"0123456789abcdef0123456789abcdef";
    let server = JwksServer::start(json!({"keys": [
        {"kty": "oct", "kid": "hs", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(k)}
    ]}))
    .await;
    let claims = claims_for(Uuid::new_v4());
    let token = sign_hs256_raw(k, &json!({"alg": "HS256", "kid": "hs"}), &claims);
    assert_eq!(
        verifier(&server).verify(&token).await.unwrap_err(),
        AuthError::BadSignature
    );
}

#[tokio::test]
async fn hs256_with_wrong_secret_is_rejected() {
    let claims = claims_for(Uuid::new_v4());
    let token = mint_hs256_claims("another-secret-that-is-at-least-32-chars", &claims);
    assert_eq!(
        hs256_only().verify(&token).await.unwrap_err(),
        AuthError::BadSignature
    );
}

#[tokio::test]
async fn hs256_without_a_configured_secret_is_rejected() {
    let token = hs256(&claims_for(Uuid::new_v4()));
    for s in [None, secret("")] {
        let v = Verifier::with_parts(TEST_ISSUER.into(), s, None, client());
        assert_eq!(
            v.verify(&token).await.unwrap_err(),
            AuthError::UnsupportedAlgorithm
        );
    }
    let token = sign_hs256_raw(b"", &json!({"alg": "HS256"}), &claims_for(Uuid::new_v4()));
    let v = Verifier::with_parts(TEST_ISSUER.into(), secret(""), None, client());
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        AuthError::UnsupportedAlgorithm
    );
}

#[tokio::test]
async fn asymmetric_token_without_jwks_is_rejected() {
    let key = TestKey::es256("ec-1");
    assert_eq!(
        hs256_only()
            .verify(&key.sign(&claims_for(Uuid::new_v4())))
            .await
            .unwrap_err(),
        AuthError::UnsupportedAlgorithm
    );
}

#[tokio::test]
async fn expired_token_is_rejected_beyond_the_leeway() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    c["exp"] = json!(now() - 60);
    assert_eq!(v.verify(&hs256(&c)).await.unwrap_err(), AuthError::Expired);
    c["exp"] = json!(now() - 10);
    v.verify(&hs256(&c)).await.unwrap();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        v.verify(&hs256(&c)).await.unwrap_err(),
        AuthError::MissingClaim("exp")
    );
    c["exp"] = json!("tomorrow");
    assert!(v.verify(&hs256(&c)).await.is_err());
}

#[tokio::test]
async fn expired_asymmetric_token_is_rejected_the_same_way() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let token = key.sign(&standard_claims(TEST_ISSUER, Uuid::new_v4(), None, -120));
    assert_eq!(
        verifier(&server).verify(&token).await.unwrap_err(),
        AuthError::Expired
    );
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected_beyond_the_leeway() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    c["nbf"] = json!(now() + 120);
    assert_eq!(
        v.verify(&hs256(&c)).await.unwrap_err(),
        AuthError::NotYetValid
    );
    c["nbf"] = json!(now() + 10);
    v.verify(&hs256(&c)).await.unwrap();
}

#[tokio::test]
async fn wrong_audience_is_rejected() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    for aud in [json!("anon"), json!(["anon", "service_role"]), json!([])] {
        c["aud"] = aud;
        assert_eq!(
            v.verify(&hs256(&c)).await.unwrap_err(),
            AuthError::WrongAudience
        );
    }
    c["aud"] = json!(["other", "authenticated"]);
    v.verify(&hs256(&c)).await.unwrap();
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        v.verify(&hs256(&c)).await.unwrap_err(),
        AuthError::MissingClaim("aud")
    );
}

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    for iss in [
        json!("http://evil.example/auth/v1"),
        json!(format!("{TEST_ISSUER}/")),
        json!("http://127.0.0.1:54321"),
        json!("supabase"),
        json!([TEST_ISSUER]),
        json!([TEST_ISSUER, "http://evil.example/auth/v1"]),
    ] {
        c["iss"] = iss;
        assert_eq!(
            v.verify(&hs256(&c)).await.unwrap_err(),
            AuthError::WrongIssuer
        );
    }
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        v.verify(&hs256(&c)).await.unwrap_err(),
        AuthError::MissingClaim("iss")
    );
}

#[tokio::test]
async fn unknown_kid_is_rejected_and_refetch_is_bounded() {
    let known = TestKey::es256("known");
    let attacker = TestKey::es256("attacker");
    let server = JwksServer::start(jwks_json(&[&known])).await;
    let v = verifier(&server);
    for _ in 0..50 {
        let kid = Uuid::new_v4().to_string();
        let token = attacker.sign_with_kid(Some(&kid), &claims_for(Uuid::new_v4()));
        assert_eq!(v.verify(&token).await.unwrap_err(), AuthError::UnknownKey);
    }
    assert_eq!(server.fetches(), 1, "one fetch for 50 random kids");

    // Warm cache: still no fetch per request.
    let before = server.fetches();
    for _ in 0..50 {
        let kid = Uuid::new_v4().to_string();
        let token = attacker.sign_with_kid(Some(&kid), &claims_for(Uuid::new_v4()));
        assert_eq!(v.verify(&token).await.unwrap_err(), AuthError::UnknownKey);
    }
    assert_eq!(server.fetches(), before);
    v.verify(&known.sign(&claims_for(Uuid::new_v4())))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_unknown_kids_cause_one_fetch() {
    let known = TestKey::es256("known");
    let server = JwksServer::start(jwks_json(&[&known])).await;
    let v = Arc::new(verifier(&server));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let v = v.clone();
        let token = known.sign_with_kid(
            Some(&Uuid::new_v4().to_string()),
            &claims_for(Uuid::new_v4()),
        );
        tasks.push(tokio::spawn(async move { v.verify(&token).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err(), AuthError::UnknownKey);
    }
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn kid_with_mismatched_key_type_or_missing_kid_is_rejected() {
    let rsa = TestKey::rs256("rsa-1");
    let ec = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&rsa, &ec])).await;
    let v = verifier(&server);
    let claims = claims_for(Uuid::new_v4());
    // An ES256 token naming the RSA key, and an RS256 token naming the EC key.
    assert_eq!(
        v.verify(&ec.sign_with_kid(Some("rsa-1"), &claims))
            .await
            .unwrap_err(),
        AuthError::UnknownKey
    );
    assert_eq!(
        v.verify(&rsa.sign_with_kid(Some("ec-1"), &claims))
            .await
            .unwrap_err(),
        AuthError::UnknownKey
    );
    assert_eq!(
        v.verify(&ec.sign_with_kid(None, &claims))
            .await
            .unwrap_err(),
        AuthError::UnknownKey
    );
    // Right kid, other key of the same type.
    let other = TestKey::es256("ec-1");
    assert_eq!(
        v.verify(&other.sign(&claims)).await.unwrap_err(),
        AuthError::BadSignature
    );
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let v = verifier(&server);
    let claims = claims_for(Uuid::new_v4());
    let mut evil = claims.clone();
    evil["sub"] = json!(Uuid::new_v4().to_string());
    evil["app_role"] = json!("admin");
    for token in [hs256(&claims), key.sign(&claims)] {
        v.verify(&token).await.unwrap();
        assert_eq!(
            v.verify(&with_payload(&token, &evil)).await.unwrap_err(),
            AuthError::BadSignature
        );
        // One payload character changed.
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload = parts[1].as_bytes().to_vec();
        payload[10] = if payload[10] == b'A' { b'B' } else { b'A' };
        let flipped = format!(
            "{}.{}.{}",
            parts[0],
            String::from_utf8(payload).unwrap(),
            parts[2]
        );
        assert!(v.verify(&flipped).await.is_err());
        // Signature changed.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let resigned = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(
            v.verify(&resigned).await.unwrap_err(),
            AuthError::BadSignature
        );
    }
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let v = hs256_only();
    let good = hs256(&claims_for(Uuid::new_v4()));
    let parts: Vec<&str> = good.split('.').collect();
    let header = b64json(&json!({"alg": "HS256", "typ": "JWT"}));
    let cases = [
        String::new(),
        "abc".to_owned(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.extra"),
        format!("{}..{}", parts[0], parts[2]),
        format!(".{}.{}", parts[1], parts[2]),
        format!("{}.{}.", parts[0], parts[1]),
        "!!!.@@@.###".to_owned(),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("not json"),
            parts[1],
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("[1,2]"),
            parts[1],
            parts[2]
        ),
        // Valid signatures over a non-JSON and a non-object payload.
        hs256_over_parts(
            TEST_JWT_SECRET.as_bytes(),
            &header,
            &URL_SAFE_NO_PAD.encode("not json"),
        ),
        hs256_over_parts(
            TEST_JWT_SECRET.as_bytes(),
            &header,
            &URL_SAFE_NO_PAD.encode("42"),
        ),
        format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES)),
    ];
    for (i, token) in cases.iter().enumerate() {
        let err = v.verify(token).await.unwrap_err();
        assert!(
            matches!(err, AuthError::Malformed | AuthError::BadSignature),
            "case {i}: {err:?}"
        );
    }
    assert_eq!(
        v.verify(&format!("{}.{}", parts[0], parts[1]))
            .await
            .unwrap_err(),
        AuthError::Malformed
    );
    let crit = sign_hs256_raw(
        TEST_JWT_SECRET.as_bytes(),
        &json!({"alg": "HS256", "crit": ["exp"]}),
        &claims_for(Uuid::new_v4()),
    );
    assert_eq!(v.verify(&crit).await.unwrap_err(), AuthError::Malformed);
}

#[tokio::test]
async fn missing_or_non_uuid_sub_is_rejected() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        v.verify(&hs256(&c)).await.unwrap_err(),
        AuthError::MissingClaim("sub")
    );
    let id = Uuid::new_v4();
    for sub in [
        json!("admin"),
        json!(""),
        json!(id.simple().to_string()),
        json!(format!("{{{id}}}")),
        json!(id.urn().to_string()),
    ] {
        c["sub"] = sub.clone();
        assert_eq!(
            v.verify(&hs256(&c)).await.unwrap_err(),
            AuthError::InvalidClaim("sub"),
            "{sub}"
        );
    }
    c["sub"] = json!(42);
    assert!(v.verify(&hs256(&c)).await.is_err());
    c["sub"] = json!(id.to_string().to_uppercase());
    assert_eq!(v.verify(&hs256(&c)).await.unwrap().sub, id);
}

#[tokio::test]
async fn non_user_roles_are_rejected() {
    let v = hs256_only();
    let mut c = claims_for(Uuid::new_v4());
    for role in [json!("service_role"), json!("anon"), json!(null), json!(1)] {
        c["role"] = role;
        assert_eq!(
            v.verify(&hs256(&c)).await.unwrap_err(),
            AuthError::InvalidClaim("role")
        );
    }
    c.as_object_mut().unwrap().remove("role");
    v.verify(&hs256(&c)).await.unwrap();
}

#[test]
fn errors_map_to_problem_codes() {
    for e in [
        AuthError::Malformed,
        AuthError::UnsupportedAlgorithm,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongAudience,
        AuthError::WrongIssuer,
        AuthError::UnknownKey,
        AuthError::MissingClaim("sub"),
        AuthError::InvalidClaim("sub"),
    ] {
        let api: ApiError = e.into();
        assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(api.code(), "invalid_token");
    }
}

#[test]
fn verifier_is_send_sync_and_debug_shows_no_secret() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Verifier>();
    assert_send_sync::<AuthUser>();
    let debug = format!("{:?}", hs256_only());
    assert!(!debug.contains(TEST_JWT_SECRET));
}

#[test]
fn new_uses_the_config_issuer_and_jwks_url() {
    let cfg = AuthConfig {
        supabase_url: "https://abcd.supabase.co".parse().unwrap(),
        jwt_secret: None,
    };
    let v = Verifier::new(&cfg, client());
    assert_eq!(v.issuer(), "https://abcd.supabase.co/auth/v1");
    assert_eq!(
        v.jwks.as_ref().unwrap().url,
        "https://abcd.supabase.co/auth/v1/.well-known/jwks.json"
    );
    assert!(v.hs256.is_none());
}

// --- extractors --------------------------------------------------------------

fn app(v: Verifier) -> Router {
    Router::new()
        .route(
            "/me",
            get(|user: AuthUser| async move { user.id().to_string() }),
        )
        .route(
            "/maybe",
            get(|user: MaybeAuthUser| async move {
                match user.0 {
                    Some(u) => u.claims().sub.to_string(),
                    None => "anonymous".to_owned(),
                }
            }),
        )
        .route(
            "/both",
            get(|a: AuthUser, b: MaybeAuthUser| async move {
                assert!(Arc::ptr_eq(&a.0, &b.0.unwrap().0));
                a.id().to_string()
            }),
        )
        .with_state(Arc::new(v))
}

async fn call(app: &Router, path: &str, auth: &[&str]) -> (StatusCode, Option<String>, String) {
    let mut req = Request::get(path);
    for a in auth {
        req = req.header(http::header::AUTHORIZATION, *a);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let ct = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

fn problem_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn extractor_requires_a_valid_bearer_token() {
    let app = app(hs256_only());
    let sub = Uuid::new_v4();
    let good = hs256(&claims_for(sub));

    let (status, ct, body) = call(&app, "/me", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(problem_code(&body), "missing_token");

    let expired = hs256(&standard_claims(TEST_ISSUER, sub, None, -120));
    for auth in [
        "Bearer not.a.token".to_owned(),
        format!("Bearer {expired}"),
        format!("Basic {good}"),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        good.clone(),
    ] {
        let (status, ct, body) = call(&app, "/me", &[&auth]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
        assert_eq!(problem_code(&body), "invalid_token");
    }

    let bearer = format!("Bearer {good}");
    let (status, _, body) = call(&app, "/me", &[&bearer]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, sub.to_string());
    let lower = format!("bearer {good}");
    let (status, _, _) = call(&app, "/me", &[&lower]).await;
    assert_eq!(status, StatusCode::OK);

    // Two Authorization headers are refused.
    let (status, _, body) = call(&app, "/me", &[&bearer, &bearer]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem_code(&body), "invalid_token");

    let (status, _, body) = call(&app, "/both", &[&bearer]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, sub.to_string());
}

#[tokio::test]
async fn optional_extractor_allows_no_header_but_not_a_bad_token() {
    let app = app(hs256_only());
    let sub = Uuid::new_v4();

    let (status, _, body) = call(&app, "/maybe", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "anonymous");

    let (status, _, body) = call(&app, "/maybe", &["Bearer garbage"]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem_code(&body), "invalid_token");

    let (status, _, body) = call(&app, "/maybe", &["Basic dXNlcjpwYXNz"]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem_code(&body), "invalid_token");

    let bearer = format!("Bearer {}", hs256(&claims_for(sub)));
    let (status, _, body) = call(&app, "/maybe", &[&bearer]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, sub.to_string());
}

#[tokio::test]
async fn extractor_reports_unavailable_jwks_as_503() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    server.set_down(true);
    let app = app(verifier(&server));
    let bearer = format!("Bearer {}", key.sign(&claims_for(Uuid::new_v4())));
    let (status, ct, body) = call(&app, "/me", &[&bearer]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(problem_code(&body), "auth_unavailable");
}
