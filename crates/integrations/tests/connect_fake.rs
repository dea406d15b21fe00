//! The Connect fake (`testing::connect`) driven by the production client:
//!
//! - its request and response shapes checked against Stripe's published
//!   OpenAPI spec (`STRIPE_OPENAPI_SPEC`, installed by
//!   `scripts/ci/stripe-openapi.sh`), with a small validator for the
//!   OpenAPI 3.0 subset Stripe uses, itself tested on wrong shapes;
//! - its Stripe semantics: idempotent replay, key reuse with other
//!   parameters, rate limits, pruned keys, refused transfers, injected
//!   failures.
//!
//! The spec tests are skipped loudly when `STRIPE_OPENAPI_SPEC` is unset,
//! unless `CI` is set (then they fail).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use stagepass_integrations::stripe::webhook;
use stagepass_integrations::stripe::{
    CapabilityStatus, CreateAccountLink, CreateExpressAccount, CreateTransfer, StripeClient,
    StripeError,
};
use stagepass_integrations::testing::connect::{
    ConnectFake, FakeOptions, ONBOARDING_DUE, SECRET_KEY, StripeCall,
};

const WEBHOOK_SECRET: &str = "whsec_connect_fake";

// ---------------------------------------------------------------------------
// The spec and the validator.

/// Stripe's OpenAPI document and checks of calls and objects against it.
struct Spec {
    doc: Value,
}

impl Spec {
    /// `None` (with a loud note) when `STRIPE_OPENAPI_SPEC` is unset and `CI`
    /// is not.
    fn load() -> Option<Spec> {
        let Some(path) = std::env::var_os("STRIPE_OPENAPI_SPEC") else {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!(
                    "STRIPE_OPENAPI_SPEC is unset in CI: source scripts/ci/stripe-openapi.sh first"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: STRIPE_OPENAPI_SPEC is unset — source \
                 scripts/ci/stripe-openapi.sh to check the Connect fake against Stripe's spec ***\n"
            );
            return None;
        };
        let text = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading STRIPE_OPENAPI_SPEC {path:?}: {e}"));
        let doc: Value = serde_json::from_slice(&text).expect("the spec is JSON");
        assert!(
            doc["paths"]["/v1/transfers"].is_object(),
            "not Stripe's spec"
        );
        Some(Spec { doc })
    }

    fn schema(&self, name: &str) -> &Value {
        let schema = &self.doc["components"]["schemas"][name];
        assert!(schema.is_object(), "the spec has no schema {name}");
        schema
    }

    /// Follows `$ref`s (`#/components/schemas/…`).
    fn resolve<'a>(&'a self, mut schema: &'a Value) -> &'a Value {
        while let Some(reference) = schema["$ref"].as_str() {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
            schema = self.schema(name);
        }
        schema
    }

    /// The operation for a concrete path: the template with the same
    /// segments, literal segments preferred over `{param}` ones.
    fn operation(&self, method: &str, path: &str) -> Result<(&str, &Value), String> {
        let wanted: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, &str, &Value)> = None;
        for (template, item) in self.doc["paths"].as_object().unwrap() {
            let segments: Vec<&str> = template.split('/').collect();
            if segments.len() != wanted.len() {
                continue;
            }
            let mut literal = 0;
            let matches = segments.iter().zip(&wanted).all(|(t, w)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !w.is_empty()
                } else {
                    literal += usize::from(t == w);
                    t == w
                }
            });
            if matches && best.is_none_or(|(score, _, _)| literal > score) {
                best = Some((literal, template, item));
            }
        }
        let (_, template, item) = best.ok_or_else(|| format!("{method} {path}: no such path"))?;
        let op = &item[method.to_ascii_lowercase()];
        if !op.is_object() {
            return Err(format!("{method} {template}: no such operation"));
        }
        Ok((template, op))
    }

    /// Everything wrong with one recorded call: path, form keys, query
    /// parameters, and the response body (200: the operation's schema;
    /// errors: `default`, Stripe's error object).
    fn check_call(&self, call: &StripeCall) -> Vec<String> {
        let at = format!("{} {}", call.method, call.path);
        let (template, op) = match self.operation(&call.method, &call.path) {
            Ok(found) => found,
            Err(e) => return vec![e],
        };
        let mut errors = Vec::new();
        let body = &op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"];
        for (key, value) in &call.form {
            let segments = parse_key(key);
            if !self.accepts(body, &segments, value) {
                errors.push(format!("{at}: form {key}={value} is not in the spec"));
            }
        }
        for (key, value) in &call.query {
            let segments = parse_key(key);
            let parameter = op["parameters"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["in"] == "query" && p["name"] == segments[0].as_str())
            });
            let accepted =
                parameter.is_some_and(|p| self.accepts(&p["schema"], &segments[1..], value));
            if !accepted {
                errors.push(format!("{at}: query {key}={value} is not in the spec"));
            }
        }
        let response = if call.status == 200 { "200" } else { "default" };
        if call.response.is_null() {
            // An answer without a body (fail_after_execute): nothing to check.
            return errors;
        }
        let schema = &op["responses"][response]["content"]["application/json"]["schema"];
        if !schema.is_object() {
            errors.push(format!("{template}: no {response} response in the spec"));
            return errors;
        }
        self.validate(
            &call.response,
            schema,
            &format!("{at} → {}", call.status),
            &mut errors,
        );
        errors
    }

    /// An event against `event`, and its `data.object` against the schema
    /// its `object` field names.
    fn check_event(&self, event: &Value) -> Vec<String> {
        let at = format!("event {}", event["type"]);
        let mut errors = Vec::new();
        self.validate(event, self.schema("event"), &at, &mut errors);
        let object = &event["data"]["object"];
        match object["object"].as_str() {
            Some(name) => self.validate(
                object,
                self.schema(name),
                &format!("{at}.data.object"),
                &mut errors,
            ),
            None => errors.push(format!("{at}: data.object has no `object`")),
        }
        errors
    }

    /// Whether a form value at `segments` (`a[b][0]` → a, b, 0) below
    /// `schema` is declared, and the value fits the leaf's type and enum.
    fn accepts(&self, schema: &Value, segments: &[String], value: &str) -> bool {
        let schema = self.resolve(schema);
        if let Some(branches) = schema["anyOf"].as_array() {
            return branches.iter().any(|b| self.accepts(b, segments, value));
        }
        let Some((first, rest)) = segments.split_first() else {
            return leaf_accepts(schema, value);
        };
        if let Some(property) = schema["properties"].get(first.as_str()) {
            return self.accepts(property, rest, value);
        }
        if schema["type"] == "array" && (first.is_empty() || first.parse::<usize>().is_ok()) {
            return self.accepts(&schema["items"], rest, value);
        }
        match &schema["additionalProperties"] {
            additional @ Value::Object(_) => self.accepts(additional, rest, value),
            _ => false,
        }
    }

    /// Validates `value` against `schema`: `$ref`, `type`, `properties`
    /// (unknown properties are errors unless `additionalProperties` allows
    /// them), `required`, `nullable`, `anyOf`, `enum`, `items`.
    fn validate(&self, value: &Value, schema: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if value.is_null() {
            if schema["nullable"] != true {
                errors.push(format!("{at}: null, but not nullable"));
            }
            return;
        }
        if let Some(branches) = schema["anyOf"].as_array() {
            let mut why = Vec::new();
            for branch in branches {
                let mut branch_errors = Vec::new();
                self.validate(value, branch, at, &mut branch_errors);
                if branch_errors.is_empty() {
                    return;
                }
                why.extend(branch_errors);
            }
            errors.push(format!(
                "{at}: matches no anyOf branch ({})",
                why.join("; ")
            ));
            return;
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        let type_ok = match schema["type"].as_str() {
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some("array") => value.is_array(),
            Some("object") => value.is_object(),
            Some(other) => {
                errors.push(format!("{at}: the validator does not know type {other}"));
                return;
            }
            None => true,
        };
        if !type_ok {
            errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
            return;
        }
        if let Some(items) = value.as_array() {
            for (index, item) in items.iter().enumerate() {
                self.validate(item, &schema["items"], &format!("{at}[{index}]"), errors);
            }
        }
        if let Some(map) = value.as_object() {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if !map.contains_key(name) {
                    errors.push(format!("{at}: required {name} is missing"));
                }
            }
            let properties = schema["properties"].as_object();
            for (name, field) in map {
                let here = format!("{at}.{name}");
                match (
                    properties.and_then(|p| p.get(name)),
                    &schema["additionalProperties"],
                ) {
                    (Some(property), _) => self.validate(field, property, &here, errors),
                    (None, additional @ Value::Object(_)) => {
                        self.validate(field, additional, &here, errors);
                    }
                    (None, Value::Bool(true)) => {}
                    // A free-form object (`type: object` without properties).
                    (None, Value::Null) if properties.is_none() => {}
                    (None, _) => errors.push(format!("{here}: not a property in the spec")),
                }
            }
        }
    }
}

/// A form value (always a string) fits a leaf schema.
fn leaf_accepts(schema: &Value, value: &str) -> bool {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.iter().any(|a| a.as_str() == Some(value))
    {
        return false;
    }
    match schema["type"].as_str() {
        Some("string") | None => true,
        Some("integer") => value.parse::<i64>().is_ok(),
        Some("number") => value.parse::<f64>().is_ok(),
        Some("boolean") => value == "true" || value == "false",
        // A scalar where the spec wants an object or a list.
        Some(_) => false,
    }
}

/// `a[b][0]` → `["a", "b", "0"]`.
fn parse_key(key: &str) -> Vec<String> {
    let (head, mut rest) = key.split_once('[').map_or((key, ""), |(h, r)| (h, r));
    let mut segments = vec![head.to_owned()];
    while let Some((inner, after)) = rest.split_once(']') {
        segments.push(inner.to_owned());
        rest = after.strip_prefix('[').unwrap_or(after);
    }
    segments
}

// ---------------------------------------------------------------------------
// Helpers.

fn now_unix() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn express(creator: &str) -> CreateExpressAccount {
    CreateExpressAccount {
        email: Some(format!("{creator}@example.com")),
        country: "US".into(),
        metadata: BTreeMap::from([("creator_id".to_owned(), creator.to_owned())]),
    }
}

fn transfer(destination: &str, group: &str, amount_cents: i64) -> CreateTransfer {
    CreateTransfer {
        amount_cents,
        currency: "usd".into(),
        destination: destination.to_owned(),
        transfer_group: group.to_owned(),
        metadata: BTreeMap::from([("payout_id".to_owned(), group.to_owned())]),
        description: Some("Stagepass payout".into()),
    }
}

/// An account with `transfers` active.
async fn onboarded(fake: &ConnectFake, creator: &str) -> String {
    let account = fake
        .client()
        .create_express_account(&express(creator), &format!("account:{creator}"))
        .await
        .unwrap();
    fake.complete_onboarding(&account.id);
    account.id
}

fn api_type(error: &StripeError) -> Option<&str> {
    match error {
        StripeError::Api(api) => Some(api.type_.as_str()),
        _ => None,
    }
}

/// Signs an event as Stripe would and reads it back as the webhook route will.
fn deliver(event: &Value) -> webhook::Event {
    let body = serde_json::to_vec(event).unwrap();
    let now = now_unix();
    let signature = webhook::sign(&body, WEBHOOK_SECRET, now).unwrap();
    webhook::verify_event(
        &body,
        &signature,
        WEBHOOK_SECRET,
        now,
        webhook::DEFAULT_TOLERANCE_SECONDS,
    )
    .unwrap()
}

async fn get_json(fake: &ConnectFake, path: &str) -> Value {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(fake.base_url().join(path).unwrap())
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

// ---------------------------------------------------------------------------
// Shapes against the spec.

#[tokio::test]
async fn every_call_and_event_of_a_payout_scenario_matches_stripes_spec() {
    let Some(spec) = Spec::load() else { return };
    let fake = ConnectFake::start().await;
    let stripe = fake.client();

    // Onboarding.
    let account = stripe
        .create_express_account(&express("c-1"), "account:c-1")
        .await
        .unwrap();
    assert!(account.id.starts_with("acct_"));
    assert!(!account.details_submitted && !account.payouts_enabled);
    assert_eq!(
        account.capabilities.transfers,
        Some(CapabilityStatus::Inactive)
    );
    assert_eq!(account.requirements.unwrap().currently_due, ONBOARDING_DUE);
    let link = stripe
        .create_account_link(&CreateAccountLink {
            account: account.id.clone(),
            refresh_url: "https://stagepass.test/creator/payouts/refresh".into(),
            return_url: "https://stagepass.test/creator/payouts/return".into(),
        })
        .await
        .unwrap();
    assert!(link.url().starts_with(&format!(
        "https://connect.stripe.test/setup/e/{}/",
        account.id
    )));
    assert_eq!(link.expires_at, link.created + 300);
    assert!(!format!("{link:?}").contains(link.url()));

    let onboarding_events = fake.complete_onboarding(&account.id);
    let types: Vec<String> = onboarding_events.iter().map(|e| deliver(e).type_).collect();
    assert_eq!(
        types,
        [webhook::ACCOUNT_UPDATED, webhook::CAPABILITY_UPDATED]
    );
    let delivered = deliver(&onboarding_events[1]);
    assert_eq!(delivered.account.as_deref(), Some(account.id.as_str()));
    assert_eq!(
        delivered.capability().unwrap().status,
        CapabilityStatus::Active
    );
    let updated = deliver(&onboarding_events[0]).connect_account().unwrap();
    assert!(updated.details_submitted && updated.can_receive_transfers());

    let account = stripe.retrieve_account(&account.id).await.unwrap();
    assert!(account.details_submitted && account.payouts_enabled);
    assert!(account.can_receive_transfers());
    assert!(account.requirements.unwrap().currently_due.is_empty());

    // A transfer, found again by its group, reversed in two steps.
    let before = stripe.retrieve_balance().await.unwrap().available_in("usd");
    let made = stripe
        .create_transfer(&transfer(&account.id, "payout:p-1", 2500), "transfer:p-1")
        .await
        .unwrap();
    assert_eq!(made.destination, account.id);
    assert_eq!(made.transfer_group.as_deref(), Some("payout:p-1"));
    assert_eq!(made.metadata["payout_id"], "payout:p-1");
    assert_eq!(
        stripe.retrieve_balance().await.unwrap().available_in("usd"),
        before - 2500
    );
    let listed = stripe.list_transfers("payout:p-1").await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&made));
    assert!(
        stripe
            .list_transfers("payout:p-2")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(stripe.retrieve_transfer(&made.id).await.unwrap(), made);

    let first = stripe
        .create_transfer_reversal(&made.id, Some(1000), "reverse:p-1:1")
        .await
        .unwrap();
    assert_eq!(
        (first.amount, first.transfer.as_str()),
        (1000, made.id.as_str())
    );
    let partly = stripe.retrieve_transfer(&made.id).await.unwrap();
    assert_eq!((partly.amount_reversed, partly.reversed), (1000, false));
    let rest = stripe
        .create_transfer_reversal(&made.id, None, "reverse:p-1:2")
        .await
        .unwrap();
    assert_eq!(rest.amount, 1500);
    let reversed = stripe.retrieve_transfer(&made.id).await.unwrap();
    assert_eq!((reversed.amount_reversed, reversed.reversed), (2500, true));
    assert_eq!(
        stripe.retrieve_balance().await.unwrap().available_in("usd"),
        before
    );

    // Refusals are checked too (against the spec's error object).
    let other = stripe
        .create_express_account(&express("c-2"), "account:c-2")
        .await
        .unwrap();
    let refused = stripe
        .create_transfer(&transfer(&other.id, "payout:p-3", 100), "transfer:p-3")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some("insufficient_capabilities_for_transfer")
    );
    assert!(
        stripe
            .retrieve_transfer("tr_missing")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Bank payouts and a restriction, as webhooks.
    for status in ["paid", "failed", "canceled"] {
        let event = deliver(&fake.bank_payout_event(&account.id, status, 2500));
        assert_eq!(event.type_, format!("payout.{status}"));
        let payout = event.bank_payout().unwrap();
        assert_eq!((payout.amount, payout.status.as_str()), (2500, status));
        assert_eq!(payout.failure_code.is_some(), status == "failed");
    }
    let restricted = fake.restrict_account(&account.id);
    let capability = deliver(&restricted[1]).capability().unwrap();
    assert_eq!(capability.status, CapabilityStatus::Inactive);
    assert!(!capability.requirements.unwrap().past_due.is_empty());

    // Events through the API.
    let reversal_events: Vec<Value> = fake
        .events()
        .into_iter()
        .filter(|e| e["type"] == webhook::TRANSFER_REVERSED)
        .collect();
    assert_eq!(reversal_events.len(), 2);
    let last = deliver(&reversal_events[1]).transfer().unwrap();
    assert!(last.reversed);
    let listed_events = get_json(&fake, "/v1/events?limit=100").await;
    assert_eq!(
        listed_events["data"].as_array().unwrap().len(),
        fake.events().len()
    );
    let one = get_json(
        &fake,
        &format!("/v1/events/{}", reversal_events[0]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(one, reversal_events[0]);

    // Every call and every event against the spec.
    let calls = fake.requests();
    let mut errors = Vec::new();
    let mut operations = BTreeSet::new();
    for call in &calls {
        errors.extend(spec.check_call(call));
        if let Ok((template, _)) = spec.operation(&call.method, &call.path) {
            operations.insert(format!("{} {template}", call.method));
        }
    }
    let events = fake.events();
    for event in &events {
        errors.extend(spec.check_event(event));
    }
    assert!(errors.is_empty(), "{errors:#?}");
    let expected: BTreeSet<String> = [
        "GET /v1/accounts/{account}",
        "GET /v1/balance",
        "GET /v1/events",
        "GET /v1/events/{id}",
        "GET /v1/transfers",
        "GET /v1/transfers/{transfer}",
        "POST /v1/account_links",
        "POST /v1/accounts",
        "POST /v1/transfers",
        "POST /v1/transfers/{id}/reversals",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(operations, expected);
    let event_types: BTreeSet<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for wanted in [
        "account.updated",
        "capability.updated",
        "payout.paid",
        "payout.failed",
        "payout.canceled",
        "transfer.created",
        "transfer.reversed",
    ] {
        assert!(event_types.contains(wanted), "no {wanted} event");
    }
    // Not vacuous: the calls carried forms, queries and error answers.
    assert!(calls.iter().any(|c| c.form.len() >= 7));
    assert!(calls.iter().any(|c| !c.query.is_empty()));
    assert!(calls.iter().any(|c| c.status == 400));
}

fn call(
    method: &str,
    path: &str,
    form: &[(&str, &str)],
    status: u16,
    response: Value,
) -> StripeCall {
    StripeCall {
        method: method.to_owned(),
        path: path.to_owned(),
        query: Vec::new(),
        form: form
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        idempotency_key: None,
        status,
        response,
        replayed: false,
        at: Instant::now(),
    }
}

#[test]
fn the_spec_check_catches_wrong_shapes() {
    let Some(spec) = Spec::load() else { return };
    let account = json!({"id": "acct_1", "object": "account", "details_submitted": false});
    let good = call(
        "POST",
        "/v1/accounts",
        &[
            ("type", "express"),
            ("capabilities[transfers][requested]", "true"),
        ],
        200,
        account.clone(),
    );
    assert_eq!(spec.check_call(&good), Vec::<String>::new());

    let wrong_field = |value: Value| {
        let mut body = account.clone();
        body["details_submitted"] = value;
        spec.check_call(&call("GET", "/v1/accounts/acct_1", &[], 200, body))
    };
    let errors = wrong_field(json!("yes"));
    assert!(
        errors.len() == 1 && errors[0].contains("details_submitted"),
        "{errors:?}"
    );
    assert_eq!(wrong_field(Value::Null).len(), 1, "not nullable");

    let mut invented = account.clone();
    invented["favourite_colour"] = json!("teal");
    let errors = spec.check_call(&call("GET", "/v1/accounts/acct_1", &[], 200, invented));
    assert!(errors[0].contains("favourite_colour"), "{errors:?}");

    let mut bad_enum = account.clone();
    bad_enum["capabilities"] = json!({"transfers": "enabled"});
    assert_eq!(
        spec.check_call(&call("GET", "/v1/accounts/acct_1", &[], 200, bad_enum))
            .len(),
        1
    );

    let no_reversals = json!({"id": "tr_1", "object": "transfer", "amount": 1,
        "amount_reversed": 0, "created": 1, "currency": "usd", "livemode": false,
        "metadata": {}, "reversed": false, "destination": {"id": "acct_1", "object": "account"}});
    let errors = spec.check_call(&call("GET", "/v1/transfers/tr_1", &[], 200, no_reversals));
    assert!(
        errors.len() == 1 && errors[0].contains("required reversals"),
        "{errors:?}"
    );

    for (key, value) in [
        ("controller[fees][payer]", "application"),
        ("capabilities[transfers][requestedd]", "true"),
        ("capabilities[transfers][requested]", "maybe"),
        ("type", "fancy"),
        ("settings[payouts][schedule][delay_days]", "soon"),
    ] {
        let errors = spec.check_call(&call(
            "POST",
            "/v1/accounts",
            &[(key, value)],
            200,
            account.clone(),
        ));
        assert_eq!(errors.len(), 1, "{key}={value}: {errors:?}");
    }
    assert!(
        spec.check_call(&call(
            "POST",
            "/v1/accounts",
            &[
                ("settings[payouts][schedule][delay_days]", "7"),
                ("metadata[any_key]", "x")
            ],
            200,
            account.clone()
        ))
        .is_empty()
    );

    let mut listing = call(
        "GET",
        "/v1/transfers",
        &[],
        200,
        json!({"object": "list",
        "data": [], "has_more": false, "url": "/v1/transfers"}),
    );
    listing.query = vec![
        ("group".into(), "g".into()),
        ("limit".into(), "many".into()),
    ];
    assert_eq!(spec.check_call(&listing).len(), 2);

    let unknown = call("POST", "/v1/payout_accounts", &[], 200, json!({}));
    assert!(spec.check_call(&unknown)[0].contains("no such path"));
    let wrong_method = call("DELETE", "/v1/transfers", &[], 200, json!({}));
    assert!(spec.check_call(&wrong_method)[0].contains("no such operation"));

    let event = json!({"id": "evt_1", "object": "event", "created": 1, "livemode": false,
        "type": "payout.paid", "data": {"object": {"id": "po_1", "object": "payout"}}});
    let errors = spec.check_event(&event);
    assert!(
        errors.iter().any(|e| e.contains("pending_webhooks")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("required arrival_date")),
        "{errors:?}"
    );
}

#[test]
fn form_keys_parse_into_segments() {
    assert_eq!(parse_key("type"), ["type"]);
    assert_eq!(
        parse_key("settings[payouts][schedule][interval]"),
        ["settings", "payouts", "schedule", "interval"]
    );
    assert_eq!(parse_key("items[0][price]"), ["items", "0", "price"]);
}

// ---------------------------------------------------------------------------
// Stripe semantics.

#[tokio::test]
async fn a_resend_with_the_same_key_replays_the_first_transfer() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let account = onboarded(&fake, "c-1").await;
    let params = transfer(&account, "payout:p-1", 700);
    let first = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap();
    let second = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(fake.transfers().len(), 1);
    let posts: Vec<StripeCall> = fake
        .requests()
        .into_iter()
        .filter(|c| c.method == "POST" && c.path == "/v1/transfers")
        .collect();
    assert_eq!(
        posts.iter().map(|c| c.replayed).collect::<Vec<_>>(),
        [false, true]
    );
    assert_eq!(posts[0].response, posts[1].response);

    // The header, as Stripe sends it.
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(fake.base_url().join("/v1/transfers").unwrap())
        .bearer_auth(SECRET_KEY)
        .header("Idempotency-Key", "transfer:p-1")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            posts[0]
                .form
                .iter()
                .fold(
                    url::form_urlencoded::Serializer::new(String::new()),
                    |mut s, (k, v)| {
                        s.append_pair(k, v);
                        s
                    },
                )
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(fake.transfers().len(), 1);
}

#[tokio::test]
async fn the_same_key_with_other_parameters_is_an_idempotency_error() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let account = onboarded(&fake, "c-1").await;
    stripe
        .create_transfer(&transfer(&account, "payout:p-1", 700), "transfer:p-1")
        .await
        .unwrap();
    let error = stripe
        .create_transfer(&transfer(&account, "payout:p-1", 800), "transfer:p-1")
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400));
    assert_eq!(api_type(&error), Some("idempotency_error"));
    // Another endpoint with the same key is "other parameters" too.
    let error = stripe
        .create_express_account(&express("c-9"), "transfer:p-1")
        .await
        .unwrap_err();
    assert_eq!(api_type(&error), Some("idempotency_error"));
    assert_eq!(fake.transfers().len(), 1);
}

#[tokio::test]
async fn errors_are_saved_and_replayed_but_unexecuted_failures_are_not() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let account = onboarded(&fake, "c-1").await;
    fake.set_available(500);
    let params = transfer(&account, "payout:p-1", 700);
    let error = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("balance_insufficient"));
    fake.set_available(10_000);
    // Stripe replays the saved 400 for the same key, even though it would
    // succeed now: a new attempt needs a new key.
    let replayed = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Some("balance_insufficient"));
    assert!(fake.requests().last().unwrap().replayed);
    assert!(fake.transfers().is_empty());

    // A 500 that never executed is not saved: the client's retry (same key)
    // executes.
    fake.fail_next("/v1/transfers", 500, 1);
    let made = stripe
        .create_transfer(&params, "transfer:p-1b")
        .await
        .unwrap();
    let statuses: Vec<(u16, bool)> = fake
        .requests()
        .iter()
        .filter(|c| c.idempotency_key.as_deref() == Some("transfer:p-1b"))
        .map(|c| (c.status, c.replayed))
        .collect();
    assert_eq!(statuses, [(500, false), (200, false)]);
    assert_eq!(fake.transfers().len(), 1);
    assert_eq!(fake.transfers()[0]["id"], made.id.as_str());
    assert_eq!(fake.transfers()[0]["amount"], 700);
}

#[tokio::test]
async fn a_lost_answer_is_recovered_by_the_retry_with_the_same_key() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let account = onboarded(&fake, "c-1").await;
    fake.fail_after_execute_next("/v1/transfers", 1);
    let made = stripe
        .create_transfer(&transfer(&account, "payout:p-1", 700), "transfer:p-1")
        .await
        .unwrap();
    let posts: Vec<(u16, bool, bool)> = fake
        .requests()
        .iter()
        .filter(|c| c.path == "/v1/transfers")
        .map(|c| (c.status, c.replayed, c.response.is_null()))
        .collect();
    assert_eq!(posts, [(500, false, true), (200, true, false)]);
    assert_eq!(fake.transfers().len(), 1);
    assert_eq!(fake.transfers()[0]["id"], made.id.as_str());

    // Without retries the caller sees the 500 although the transfer exists:
    // only a look-up by group tells.
    fake.fail_after_execute_next("/v1/transfers", 1);
    let once = stripe.clone().with_max_attempts(1);
    let error = once
        .create_transfer(&transfer(&account, "payout:p-2", 300), "transfer:p-2")
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(500));
    assert_eq!(stripe.list_transfers("payout:p-2").await.unwrap().len(), 1);
}

#[tokio::test]
async fn beyond_the_rate_limit_stripe_answers_429_per_endpoint() {
    let fake = ConnectFake::start_with(FakeOptions {
        rate_limit_per_second: Some(2),
        ..FakeOptions::default()
    })
    .await;
    let stripe = fake.client().with_max_attempts(1);
    let started = Instant::now();
    let results = futures_join(&stripe, 5).await;
    let within_window = started.elapsed() < Duration::from_millis(900);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(StripeError::RateLimited { .. })))
        .count();
    if within_window {
        assert_eq!((ok, limited), (2, 3), "{results:?}");
        assert_eq!(fake.beyond_limit_count(), 3);
        // Another endpoint has its own window.
        assert!(stripe.list_transfers("payout:p-1").await.is_ok());
    }
    let limited_calls = fake.requests().iter().filter(|c| c.status == 429).count();
    assert_eq!(limited_calls, fake.beyond_limit_count());
    assert!(
        fake.requests()
            .iter()
            .filter(|c| c.status == 429)
            .all(|c| c.response["error"]["code"] == "rate_limit")
    );
    // The window slides.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(stripe.retrieve_balance().await.is_ok());
}

/// `n` balance reads at once.
async fn futures_join(
    stripe: &StripeClient,
    n: usize,
) -> Vec<Result<stagepass_integrations::stripe::Balance, StripeError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let stripe = stripe.clone();
            tokio::spawn(async move { stripe.retrieve_balance().await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test]
async fn after_stripe_forgets_the_key_a_resend_transfers_twice() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let account = onboarded(&fake, "c-1").await;
    let params = transfer(&account, "payout:p-1", 700);
    let first = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap();
    fake.forget_idempotency_keys();
    let second = stripe
        .create_transfer(&params, "transfer:p-1")
        .await
        .unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(fake.transfers().len(), 2);
    // Which is why a caller looks the group up before creating.
    assert_eq!(stripe.list_transfers("payout:p-1").await.unwrap().len(), 2);
}

#[tokio::test]
async fn transfers_need_an_active_transfers_capability() {
    let fake = ConnectFake::start().await;
    let stripe = fake.client();
    let before = stripe.retrieve_balance().await.unwrap().available_in("usd");
    let fresh = stripe
        .create_express_account(&express("c-1"), "account:c-1")
        .await
        .unwrap();
    let error = stripe
        .create_transfer(&transfer(&fresh.id, "payout:p-1", 700), "transfer:p-1")
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400));
    assert_eq!(error.code(), Some("insufficient_capabilities_for_transfer"));

    fake.complete_onboarding(&fresh.id);
    stripe
        .create_transfer(&transfer(&fresh.id, "payout:p-2", 700), "transfer:p-2")
        .await
        .unwrap();
    fake.restrict_account(&fresh.id);
    let account = stripe.retrieve_account(&fresh.id).await.unwrap();
    assert!(!account.can_receive_transfers());
    let error = stripe
        .create_transfer(&transfer(&fresh.id, "payout:p-3", 700), "transfer:p-3")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("insufficient_capabilities_for_transfer"));
    assert_eq!(fake.transfers().len(), 1);
    assert_eq!(
        stripe.retrieve_balance().await.unwrap().available_in("usd"),
        before - 700
    );
    // An unknown destination is refused as well.
    let error = stripe
        .create_transfer(&transfer("acct_nobody", "payout:p-4", 1), "transfer:p-4")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("resource_missing"));
}

#[tokio::test]
async fn only_secret_keys_are_accepted() {
    let fake = ConnectFake::start().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let publishable = StripeClient::new(
        fake.base_url(),
        secrecy::SecretString::from("pk_test_nope"),
        http.clone(),
    );
    let error = publishable.retrieve_balance().await.unwrap_err();
    assert_eq!(error.status(), Some(401));
    let other_secret = StripeClient::new(
        fake.base_url(),
        secrecy::SecretString::from("sk_live_x"),
        http,
    );
    assert!(other_secret.retrieve_balance().await.is_ok());
    assert_eq!(fake.count("GET", "/v1/balance"), 2);
}
