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
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| field_error(e, bytes))?;
    de.end()
        .map_err(|_| ApiError::BadRequest("trailing characters after the JSON body".into()))?;
    Ok(value)
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
