//! A JSON body extractor that names the failing field.
//!
//! Request types derive `Deserialize` with `#[serde(deny_unknown_fields)]`;
//! this extractor turns serde's first error into a 400 `validation_failed`
//! problem whose `errors[0].field` is the path of the offending field.

use axum::extract::{FromRequest, Request};
use http::header;
use serde::de::DeserializeOwned;

use super::problem::{ApiError, FieldError};

/// Largest JSON body a route accepts.
pub const MAX_JSON_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|_| ApiError::PayloadTooLarge)?;
        parse_text(&bytes).map(JsonBody)
    }
}

/// [`parse`] for text from a client: first every string is checked against
/// the shared character rules ([`super::text`]), so no route can store a NUL
/// (a 500 from Postgres) or a bidi override, whatever its own checks.
pub fn parse_text<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Ok(document) = serde_json::from_slice::<serde_json::Value>(bytes) {
        super::text::check_json(&document)?;
    }
    parse(bytes)
}

/// Parses a JSON document into `T`, naming the failing field on error.
///
/// A whole number written with a fraction or exponent (`377.0`, `3.77e2`) is
/// the integer it denotes: JSON has one number type, and the OpenAPI
/// document's `"type": "integer"` (JSON Schema) admits `377.0`, while serde
/// refuses it for an integer field. Such a body is parsed again with those
/// numbers spelled as integers, only after the first parse failed, so the
/// usual path costs nothing and every other refusal (duplicate keys, unknown
/// fields, real fractions) stays as it was.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match parse_exact(bytes) {
        Err(e) => match integers_spelled_plainly(bytes) {
            Some(rewritten) => parse_exact(&rewritten),
            None => Err(e),
        },
        ok => ok,
    }
}

fn parse_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| field_error(e, bytes))?;
    de.end()
        .map_err(|_| ApiError::BadRequest("trailing characters after the JSON body".into()))?;
    Ok(value)
}

/// Largest magnitude a JSON number can have and still be read back exactly
/// as an `f64` (2^53): beyond it `1e300` is not a meaningful integer.
const EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;

/// `bytes` with every number token outside strings that is a whole number
/// written with `.` or an exponent rewritten as a plain integer; `None` when
/// there is none (or the body is not UTF-8).
fn integers_spelled_plainly(bytes: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut chars = text.char_indices().peekable();
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        out.push(escaped);
                    }
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if c == '-' || c.is_ascii_digit() {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-') {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let token = &text[i..end];
            let whole = token
                .contains(['.', 'e', 'E'])
                .then(|| token.parse::<f64>().ok())
                .flatten()
                .filter(|v| v.fract() == 0.0 && v.abs() <= EXACT_FLOAT);
            match whole {
                Some(v) => {
                    // Exact: |v| <= 2^53, so the cast neither rounds nor saturates.
                    out.push_str(&(v as i64).to_string());
                    changed = true;
                }
                None => out.push_str(token),
            }
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    changed.then(|| out.into_bytes())
}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>, bytes: &[u8]) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        // serde_json reports some type errors as syntax errors (an enum given
        // a number, boolean or array: "expected value"). Only a body that is
        // not JSON at all is malformed; otherwise name the field.
        if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
            return ApiError::BadRequest(format!("the body is not valid JSON: {inner}"));
        }
        let field = if path == "." { "body".to_owned() } else { path };
        return ApiError::Validation(vec![FieldError {
            field,
            message: "has the wrong type or an invalid value".to_owned(),
        }]);
    }
    let message = strip_position(&inner.to_string());
    // serde_path_to_error (0.1.20) reports an unknown field at its own path
    // (`role`, `items[0].role`); older versions at its parent's. Name the
    // field exactly once either way.
    let field = match message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(unknown) if path == "." => unknown.to_owned(),
        Some(unknown) if path == unknown || path.ends_with(&format!(".{unknown}")) => path,
        Some(unknown) => format!("{path}.{unknown}"),
        None if path == "." => missing_field(&message).unwrap_or_else(|| "body".to_owned()),
        None => match missing_field(&message) {
            Some(m) => format!("{path}.{m}"),
            None => path,
        },
    };
    ApiError::Validation(vec![FieldError { field, message }])
}

fn missing_field(message: &str) -> Option<String> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_owned)
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        handle: String,
        amount: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Kind {
        Tip,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct WithEnum {
        kind: Kind,
    }

    fn field_of(r: Result<Body, ApiError>) -> String {
        match r {
            Err(ApiError::Validation(errors)) => errors[0].field.clone(),
            other => panic!("expected validation error, got {other:?}"),
        }
    }

    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let b: Body = parse(br#"{"handle":"a.0 1e2","amount":377.0}"#).expect("377.0 is 377");
        assert_eq!(b.amount, 377);
        assert_eq!(b.handle, "a.0 1e2", "strings are untouched");
        let b: Body = parse(br#"{"handle":"\"1.0","amount":3.77e2}"#).expect("3.77e2 is 377");
        assert_eq!((b.handle.as_str(), b.amount), ("\"1.0", 377));
        // A real fraction, a negative or huge number for a u32 stay refused
        // and name the field; so do duplicate keys.
        assert_eq!(field_of(parse(br#"{"handle":"a","amount":1.5}"#)), "amount");
        assert_eq!(
            field_of(parse(br#"{"handle":"a","amount":-1.0}"#)),
            "amount"
        );
        assert_eq!(
            field_of(parse(br#"{"handle":"a","amount":1e300}"#)),
            "amount"
        );
        assert!(parse::<Body>(br#"{"handle":"a","amount":1.0,"amount":2}"#).is_err());
        assert_eq!(
            integers_spelled_plainly(br#"{"a":[1,2.5,-0.0,"7.0"]}"#).as_deref(),
            Some(&br#"{"a":[1,2.5,0,"7.0"]}"#[..])
        );
        assert_eq!(integers_spelled_plainly(br#"{"a":1}"#), None);
    }

    #[test]
    fn names_the_failing_field() {
        assert_eq!(field_of(parse(br#"{"handle":"a","amount":"x"}"#)), "amount");
        assert_eq!(
            field_of(parse(br#"{"handle":"a","amount":1,"role":"admin"}"#)),
            "role"
        );
        assert_eq!(field_of(parse(br#"{"handle":"a"}"#)), "amount");
        assert!(matches!(
            parse::<Body>(b"{nope"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(parse::<Body>(br#"{"handle":"a","amount":1}"#).is_ok());
    }

    #[test]
    fn an_enum_of_the_wrong_type_names_the_field() {
        // serde_json calls these syntax errors; the body is valid JSON.
        for body in [
            &br#"{"kind":1}"#[..],
            br#"{"kind":true}"#,
            br#"{"kind":["tip"]}"#,
        ] {
            match parse::<WithEnum>(body) {
                Err(ApiError::Validation(errors)) => assert_eq!(errors[0].field, "kind"),
                other => panic!("expected a validation error, got {other:?}"),
            }
        }
        assert!(matches!(
            parse::<WithEnum>(br#"{"kind":1"#),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse::<WithEnum>(br#"{"kind":tip}"#),
            Err(ApiError::BadRequest(_))
        ));
        assert!(parse::<WithEnum>(br#"{"kind":"tip"}"#).is_ok());
    }
}
