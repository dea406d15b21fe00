use serde_json::json;

use super::*;
use crate::stripe::PaymentIntentStatus;

const SECRET: &str = "whsec_test";
const TOLERANCE: i64 = DEFAULT_TOLERANCE_SECONDS;
/// A `payment_intent.succeeded` event exactly as localstripe 1.15.10 sent it.
const LOCALSTRIPE_EVENT: &[u8] =
    include_bytes!("../../../tests/fixtures/localstripe_payment_intent_succeeded.json");
const LOCALSTRIPE_T: i64 = 1_795_817_363;

fn signed_at(t: i64) -> String {
    sign(LOCALSTRIPE_EVENT, SECRET, t).unwrap()
}

#[test]
fn matches_an_independent_implementation() {
    // Computed with Python's hmac over the fixture file:
    // hmac.new(b"whsec_test", b"1795817363." + body, sha256).hexdigest()
    let expected = "t=1795817363,\
        v1=44e49e01789661a18ef10aa39e7cd54df8d14671aacb6fb8d2ee2a85269c5410";
    assert_eq!(signed_at(LOCALSTRIPE_T), expected);
    assert_eq!(
        verify(
            LOCALSTRIPE_EVENT,
            expected,
            SECRET,
            LOCALSTRIPE_T,
            TOLERANCE
        ),
        Ok(())
    );
}

#[test]
fn wrong_secret_is_rejected() {
    let header = signed_at(LOCALSTRIPE_T);
    assert_eq!(
        verify(
            LOCALSTRIPE_EVENT,
            &header,
            "whsec_other",
            LOCALSTRIPE_T,
            TOLERANCE
        ),
        Err(WebhookError::SignatureMismatch)
    );
    // The key is the whole secret, prefix included.
    assert_eq!(
        verify(LOCALSTRIPE_EVENT, &header, "test", LOCALSTRIPE_T, TOLERANCE),
        Err(WebhookError::SignatureMismatch)
    );
}

#[test]
fn tampered_body_is_rejected() {
    let header = signed_at(LOCALSTRIPE_T);
    let mut body = LOCALSTRIPE_EVENT.to_vec();
    let at = body.iter().position(|&b| b == b'5').unwrap();
    body[at] = b'9'; // "amount": 500 → 900
    assert_eq!(
        verify(&body, &header, SECRET, LOCALSTRIPE_T, TOLERANCE),
        Err(WebhookError::SignatureMismatch)
    );
    // Re-serialising (e.g. parsing before verifying) changes the bytes too.
    let reparsed = serde_json::to_vec(
        &serde_json::from_slice::<serde_json::Value>(LOCALSTRIPE_EVENT).unwrap(),
    )
    .unwrap();
    assert_eq!(
        verify(&reparsed, &header, SECRET, LOCALSTRIPE_T, TOLERANCE),
        Err(WebhookError::SignatureMismatch)
    );
}

#[test]
fn a_changed_timestamp_is_rejected() {
    let header = signed_at(LOCALSTRIPE_T).replace("t=1795817363", "t=1795817364");
    assert_eq!(
        verify(LOCALSTRIPE_EVENT, &header, SECRET, LOCALSTRIPE_T, TOLERANCE),
        Err(WebhookError::SignatureMismatch)
    );
}

#[test]
fn stale_and_future_timestamps_are_rejected() {
    let header = signed_at(LOCALSTRIPE_T);
    let now = LOCALSTRIPE_T + TOLERANCE;
    assert_eq!(
        verify(LOCALSTRIPE_EVENT, &header, SECRET, now, TOLERANCE),
        Ok(())
    );
    assert_eq!(
        verify(LOCALSTRIPE_EVENT, &header, SECRET, now + 1, TOLERANCE),
        Err(WebhookError::TimestampOutsideTolerance {
            age_seconds: TOLERANCE + 1,
            tolerance_seconds: TOLERANCE
        })
    );
    assert_eq!(
        verify(
            LOCALSTRIPE_EVENT,
            &header,
            SECRET,
            LOCALSTRIPE_T - TOLERANCE - 1,
            TOLERANCE
        ),
        Err(WebhookError::TimestampOutsideTolerance {
            age_seconds: -TOLERANCE - 1,
            tolerance_seconds: TOLERANCE
        })
    );
}

/// SPEC §6 defect 3: the old system rejected every Stripe retry. Stripe signs
/// each delivery attempt with that attempt's time, so a retry of an old event
/// verifies, while a replay of the old delivery does not.
#[test]
fn a_retry_of_an_old_event_is_re_signed_and_verifies() {
    let first_attempt = signed_at(LOCALSTRIPE_T);
    let three_days_later = LOCALSTRIPE_T + 3 * 24 * 3600;
    let retry = signed_at(three_days_later - 2);

    let event = verify_event(
        LOCALSTRIPE_EVENT,
        &retry,
        SECRET,
        three_days_later,
        TOLERANCE,
    )
    .expect("a re-signed retry verifies");
    assert_eq!(
        event.created, LOCALSTRIPE_T,
        "created is the event's age, not the attempt's"
    );
    assert!(three_days_later - event.created > TOLERANCE);

    assert!(matches!(
        verify(
            LOCALSTRIPE_EVENT,
            &first_attempt,
            SECRET,
            three_days_later,
            TOLERANCE
        ),
        Err(WebhookError::TimestampOutsideTolerance { .. })
    ));
}

#[test]
fn any_matching_v1_is_enough() {
    let good = signed_at(LOCALSTRIPE_T);
    let good_v1 = good.split_once(",v1=").unwrap().1;
    let other = sign(LOCALSTRIPE_EVENT, "whsec_old", LOCALSTRIPE_T).unwrap();
    let other_v1 = other.split_once(",v1=").unwrap().1;

    // During a secret roll Stripe sends one v1 per active secret.
    for header in [
        format!("t={LOCALSTRIPE_T},v1={other_v1},v1={good_v1}"),
        format!("t={LOCALSTRIPE_T},v1={good_v1},v1={other_v1}"),
        format!("t={LOCALSTRIPE_T},v0=abc,v1=nothex,v1={good_v1}"),
        format!("v1={good_v1}, t={LOCALSTRIPE_T}"),
        format!("t={LOCALSTRIPE_T},v1={}", good_v1.to_uppercase()),
    ] {
        assert_eq!(
            verify(LOCALSTRIPE_EVENT, &header, SECRET, LOCALSTRIPE_T, TOLERANCE),
            Ok(()),
            "{header}"
        );
    }
    let header = format!("t={LOCALSTRIPE_T},v1={other_v1}");
    assert_eq!(
        verify(
            LOCALSTRIPE_EVENT,
            &header,
            "whsec_old",
            LOCALSTRIPE_T,
            TOLERANCE
        ),
        Ok(())
    );
}

#[test]
fn malformed_headers_are_rejected() {
    let v1 = "0".repeat(64);
    let cases = [
        (
            "",
            WebhookError::MalformedHeader("an item is not key=value"),
        ),
        (
            "garbage",
            WebhookError::MalformedHeader("an item is not key=value"),
        ),
        (
            &*format!("t=abc,v1={v1}"),
            WebhookError::MalformedHeader("t is not an integer"),
        ),
        (
            &*format!("t=1,t=2,v1={v1}"),
            WebhookError::MalformedHeader("more than one t"),
        ),
        (&*format!("v1={v1}"), WebhookError::MalformedHeader("no t")),
        ("t=1", WebhookError::NoSignature),
        (&*format!("t=1,v0={v1}"), WebhookError::NoSignature),
        ("t=1,v1=", WebhookError::SignatureMismatch),
        ("t=1,v1=abcd", WebhookError::SignatureMismatch),
    ];
    for (header, expected) in cases {
        assert_eq!(
            verify(LOCALSTRIPE_EVENT, header, SECRET, 1, TOLERANCE),
            Err(expected),
            "{header:?}"
        );
    }
}

#[test]
fn an_empty_secret_never_verifies() {
    let header = format!("t=1,v1={}", "0".repeat(64));
    assert_eq!(
        verify(b"{}", &header, "", 1, TOLERANCE),
        Err(WebhookError::EmptySecret)
    );
    assert_eq!(sign(b"{}", "", 1), Err(WebhookError::EmptySecret));
}

#[test]
fn localstripe_event_parses_into_a_payment_intent() {
    let event = verify_event(
        LOCALSTRIPE_EVENT,
        &signed_at(LOCALSTRIPE_T),
        SECRET,
        LOCALSTRIPE_T,
        TOLERANCE,
    )
    .unwrap();
    assert_eq!(event.id, "evt_0GaMTPtnMRUN1f");
    assert_eq!(event.kind(), EventKind::PaymentIntentSucceeded);
    let pi = event.payment_intent().unwrap();
    assert_eq!(pi.status, PaymentIntentStatus::Succeeded);
    assert_eq!(pi.amount_cents, 500);
    assert_eq!(pi.metadata["user_id"], "u1");
    assert_eq!(
        event.charge(),
        Err(EventError::UnexpectedObject {
            expected: "charge",
            found: Some("payment_intent".into())
        })
    );
    assert!(!format!("{event:?}").contains("secret"));
}

#[test]
fn a_signed_body_that_is_not_an_event_is_invalid_payload() {
    let header = sign(b"[1,2]", SECRET, 10).unwrap();
    assert!(matches!(
        verify_event(b"[1,2]", &header, SECRET, 10, TOLERANCE),
        Err(WebhookError::InvalidPayload(_))
    ));
}

#[test]
fn charge_refunded_and_dispute_created_events() {
    let refunded = json!({
        "id": "evt_r", "object": "event", "type": "charge.refunded", "created": 1,
        "data": {"object": {
            "id": "ch_1", "object": "charge", "amount": 1900, "amount_refunded": 1900,
            "currency": "usd", "payment_intent": "pi_1", "refunded": true
        }}
    });
    let event = Event::from_slice(refunded.to_string().as_bytes()).unwrap();
    assert_eq!(event.kind(), EventKind::ChargeRefunded);
    let charge = event.charge().unwrap();
    assert_eq!(charge.payment_intent.as_deref(), Some("pi_1"));
    assert_eq!(charge.amount_refunded_cents, 1900);
    assert!(charge.refunded);

    let disputed = json!({
        "id": "evt_d", "object": "event", "type": "charge.dispute.created", "created": 1,
        "data": {"object": {
            "id": "dp_1", "object": "dispute", "amount": 1900, "currency": "usd",
            "charge": "ch_1", "payment_intent": "pi_1", "reason": "fraudulent",
            "status": "needs_response"
        }}
    });
    let event = Event::from_slice(disputed.to_string().as_bytes()).unwrap();
    assert_eq!(event.kind(), EventKind::ChargeDisputeCreated);
    let dispute = event.dispute().unwrap();
    assert_eq!(dispute.charge, "ch_1");
    assert_eq!(dispute.amount_cents, 1900);

    let other = json!({"id": "evt_o", "type": "customer.created", "created": 1,
        "data": {"object": {"object": "customer"}}});
    let event = Event::from_slice(other.to_string().as_bytes()).unwrap();
    assert_eq!(event.kind(), EventKind::Other);
}

#[test]
fn connect_events_name_the_account_and_decode_their_objects() {
    let body = json!({
        "id": "evt_1", "object": "event", "type": "capability.updated", "created": 10,
        "livemode": false, "account": "acct_1", "pending_webhooks": 1,
        "data": {"object": {"id": "transfers", "object": "capability", "account": "acct_1",
            "status": "active", "requested": true,
            "requirements": {"currently_due": [], "past_due": [], "eventually_due": []}}}
    })
    .to_string();
    let event = Event::from_slice(body.as_bytes()).unwrap();
    assert_eq!(event.account.as_deref(), Some("acct_1"));
    assert!(format!("{event:?}").contains("acct_1"));
    let capability = event.capability().unwrap();
    assert_eq!(capability.status, crate::stripe::CapabilityStatus::Active);
    assert!(matches!(
        event.bank_payout(),
        Err(EventError::UnexpectedObject {
            expected: "payout",
            ..
        })
    ));

    let body = json!({
        "id": "evt_2", "object": "event", "type": PAYOUT_FAILED, "created": 10,
        "account": "acct_1",
        "data": {"object": {"id": "po_1", "object": "payout", "amount": 900,
            "currency": "usd", "status": "failed", "failure_code": "account_closed",
            "arrival_date": 20}}
    })
    .to_string();
    let payout = Event::from_slice(body.as_bytes())
        .unwrap()
        .bank_payout()
        .unwrap();
    assert_eq!(payout.failure_code.as_deref(), Some("account_closed"));
    assert_eq!(payout.amount, 900);

    let platform = json!({"id": "evt_3", "type": TRANSFER_REVERSED, "created": 1,
        "data": {"object": {}}})
    .to_string();
    assert_eq!(
        Event::from_slice(platform.as_bytes()).unwrap().account,
        None
    );
}
