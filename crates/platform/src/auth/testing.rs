//! Token minting for tests anywhere in the workspace (feature `testing`).
//!
//! Never enabled in a deployed build. Asymmetric keys are generated fresh
//! for every [`TestKey`] (aws-lc-rs), so two test keys never share material.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A local stand-in for `SUPABASE_URL`.
pub const TEST_ISSUER_BASE: &str = "http://127.0.0.1:54321";
/// The issuer matching [`TEST_ISSUER_BASE`] (`{SUPABASE_URL}/auth/v1`).
pub const TEST_ISSUER: &str = "http://127.0.0.1:54321/auth/v1";
/// An HS256 project secret for tests (≥ 32 characters, like the real one).
pub const TEST_JWT_SECRET: &str = "test-only-supabase-jwt-secret-0123456789abcdef";

/// The claims of a Supabase user access token: `aud` and `role`
/// `authenticated`, `iat`, `exp = now + ttl_seconds` (negative for an
/// expired token), `iss`, `sub`, `email` (omitted when `None`), a random
/// `session_id`, and `user_metadata.email_verified` true when an e-mail is given.
pub fn standard_claims(
    issuer: &str,
    sub: uuid::Uuid,
    email: Option<&str>,
    ttl_seconds: i64,
) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": issuer,
        "sub": sub.to_string(),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + ttl_seconds,
        "session_id": uuid::Uuid::new_v4().to_string(),
        "aal": "aal1",
        "is_anonymous": false,
        "app_metadata": { "provider": "email", "providers": ["email"] },
        "user_metadata": { "email_verified": email.is_some() },
    });
    if let Some(email) = email {
        claims["email"] = json!(email);
    }
    claims
}

/// An HS256 access token with [`standard_claims`].
pub fn mint_hs256(
    secret: &str,
    issuer: &str,
    sub: uuid::Uuid,
    email: Option<&str>,
    ttl_seconds: i64,
) -> String {
    mint_hs256_claims(secret, &standard_claims(issuer, sub, email, ttl_seconds))
}

/// An HS256 token with arbitrary claims.
pub fn mint_hs256_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// A token with exactly the given header and claims JSON and an HS256
/// signature made with `secret` (for forged or odd headers).
pub fn sign_hs256_raw(secret: &[u8], header: &Value, claims: &Value) -> String {
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!(
        "{}.{}",
        b64.encode(serde_json::to_vec(header).expect("JSON")),
        b64.encode(serde_json::to_vec(claims).expect("JSON")),
    );
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    format!("{message}.{}", b64.encode(mac.finalize().into_bytes()))
}

/// An asymmetric signing key (ES256 or RS256) with its public JWK.
pub struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    public_key_pem: String,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

impl TestKey {
    /// A fresh P-256 key.
    pub fn es256(kid: &str) -> TestKey {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("EC keygen");
        let pkcs8 = pair.to_pkcs8v1().expect("EC PKCS#8");
        let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
        let spki = pair.public_key().as_der().expect("EC public key DER");
        TestKey::new(kid, Algorithm::ES256, encoding, spki.as_ref())
    }

    /// A fresh 2048-bit RSA key.
    pub fn rs256(kid: &str) -> TestKey {
        use aws_lc_rs::rsa::{KeyPair, KeySize};
        let pair = KeyPair::generate(KeySize::Rsa2048).expect("RSA keygen");
        let pkcs8 = pair.as_der().expect("RSA PKCS#8");
        let encoding = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
            .expect("RSA PKCS#8 PEM");
        let spki = pair.public_key().as_der().expect("RSA public key DER");
        TestKey::new(kid, Algorithm::RS256, encoding, spki.as_ref())
    }

    fn new(kid: &str, alg: Algorithm, encoding: EncodingKey, spki_der: &[u8]) -> TestKey {
        let jwk = Jwk::from_encoding_key(&encoding, alg).expect("public JWK");
        let mut jwk = serde_json::to_value(jwk).expect("JWK JSON");
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        TestKey {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
            public_key_pem: pem("PUBLIC KEY", spki_der),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// A token with header `{alg, typ: JWT, kid}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(Some(&self.kid), claims)
    }

    /// A token signed by this key but naming another `kid` (or none).
    pub fn sign_with_kid(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing")
    }

    /// The public JWK (`kty`, `crv`/`x`/`y` or `n`/`e`, `alg`, `kid`, `use`).
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// The public key as SubjectPublicKeyInfo PEM (for algorithm-confusion tests).
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }
}

/// `{"keys": [...]}` of the given keys' public JWKs.
pub fn jwks_json(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
