//! Stripe's request encoding: `application/x-www-form-urlencoded` with
//! bracketed keys for nested values (`metadata[user_id]=…`,
//! `payment_method_types[0]=card`).

use std::collections::BTreeMap;

/// An ordered list of form fields, encoded once when the request is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn field(mut self, key: &str, value: impl Into<String>) -> Self {
        self.pairs.push((key.to_owned(), value.into()));
        self
    }

    pub(crate) fn optional(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.field(key, v),
            None => self,
        }
    }

    /// `prefix[key]=value` for every entry, in key order (a `BTreeMap`), so the
    /// same parameters always encode to the same body; Stripe compares bodies
    /// of requests that reuse an idempotency key.
    pub(crate) fn map(mut self, prefix: &str, map: &BTreeMap<String, String>) -> Self {
        for (key, value) in map {
            self.pairs.push((format!("{prefix}[{key}]"), value.clone()));
        }
        self
    }

    /// `prefix[0]=a&prefix[1]=b`: indexed, as Stripe's own libraries send lists.
    pub(crate) fn list(mut self, prefix: &str, items: &[String]) -> Self {
        for (index, item) in items.iter().enumerate() {
            self.pairs
                .push((format!("{prefix}[{index}]"), item.clone()));
        }
        self
    }

    pub(crate) fn encode(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .finish()
    }

    #[cfg(test)]
    pub(crate) fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_metadata_and_lists_use_bracketed_keys() {
        let metadata = BTreeMap::from([
            ("user_id".to_owned(), "u-1".to_owned()),
            ("package".to_owned(), "mega".to_owned()),
        ]);
        let form = Form::new()
            .field("amount", "500")
            .map("metadata", &metadata)
            .list("payment_method_types", &["card".to_owned()]);
        let keys: Vec<&str> = form.pairs().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "amount",
                "metadata[package]",
                "metadata[user_id]",
                "payment_method_types[0]"
            ]
        );
        assert_eq!(
            form.encode(),
            "amount=500&metadata%5Bpackage%5D=mega&metadata%5Buser_id%5D=u-1\
             &payment_method_types%5B0%5D=card"
        );
    }

    #[test]
    fn values_are_percent_encoded() {
        let form = Form::new().field("description", "a&b=c d+é");
        assert_eq!(form.encode(), "description=a%26b%3Dc+d%2B%C3%A9");
    }

    #[test]
    fn absent_optional_fields_are_left_out() {
        let form = Form::new()
            .optional("payment_method", None)
            .optional("customer", Some("cus_1"));
        assert_eq!(form.encode(), "customer=cus_1");
    }
}
