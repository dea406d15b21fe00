//! `GET /api/v1/openapi.json` — the OpenAPI 3.1 document, generated from the
//! handlers' annotations. A test checks that every function's paths are in it.

use std::sync::LazyLock;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{HeaderValue, header};
use serde::Serialize;

mod truth;
pub use truth::REALTIME;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use stagepass_platform::serve::{Function, Limits};

pub const FUNCTION: Function = Function {
    name: "v1_openapi",
    limits: Limits::Public,
    paths: &["/api/v1/openapi.json"],
    build: |_, _| {
        Some(
            Router::new()
                .route("/api/v1/openapi.json", get(serve))
                // Vercel serves this file at /api/v1/openapi; vercel.json rewrites the .json path.
                .route("/api/v1/openapi", get(serve)),
        )
    },
};

/// An RFC 9457 problem document, as every error is sent. Only the name is
/// used by the annotations (`body = Problem`); the schema itself is
/// [`problem_schema`], which says which members are optional rather than
/// nullable (absent members are not sent).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub code: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Stagepass API", version = "1",
         description = "Creator platform backend. Errors are application/problem+json (RFC 9457)."),
    paths(
        crate::health::health,
        crate::health::ready,
        crate::me::get_me,
        crate::me::patch_me,
        crate::admin::set_role,
        crate::grants::create_grant,
        crate::flags::list_flags,
        crate::flags::create_flag,
        crate::flags::get_flag,
        crate::flags::patch_flag,
        crate::tokens::packages,
        crate::tokens::balance,
        crate::tokens::ledger,
        crate::tips::create_tip,
        crate::purchases::create_purchase,
        crate::classes::list_classes,
        crate::classes::create_class,
        crate::classes::get_class,
        crate::classes::patch_class,
        crate::classes::enroll,
        crate::classes::withdraw,
        crate::classes::cancel_class,
        crate::calls::request_call,
        crate::calls::get_call,
        crate::calls::call_action,
        crate::calls::call_token,
        crate::calls::my_calls,
        crate::calls::my_call_settings,
        crate::calls::put_call_settings,
        crate::calls::creator_call_settings,
        crate::schedule::schedule,
        crate::schedule::rotate_feed_token,
        crate::schedule::feed,
        crate::realtime::realtime_token,
        crate::jobs::class_reminder,
        crate::jobs::call_tick,
        crate::webhooks::stripe_webhook,
        crate::webhooks::agora_webhook,
        crate::cron::ledger_audit,
        crate::cron::cleanup,
        crate::cron::reconcile_purchases,
        crate::cron::settle_classes,
        crate::cron::deliver_outbox,
        crate::cron::bill_calls,
        crate::payouts::my_payout_account,
        crate::payouts::onboarding_link,
        crate::payouts::request_payout,
        crate::payouts::my_payouts,
        crate::payouts::my_payout,
        crate::payouts::payout_earnings_csv,
        crate::payouts::set_payout_hold,
        crate::payouts::payouts_cron,
        crate::payouts::payout_transfer_job,
        crate::payouts::connect_webhook,
        access_token_hook_doc,
        openapi_doc,
    ),
    components(schemas(Problem, crate::calls::CallAction)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A Supabase access token"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "qstash",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Upstash-Signature",
                    "QStash: a JWT signed with the current or next signing key",
                ),
            )),
        );
        components.add_security_scheme(
            "cron",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Vercel Cron: Bearer $CRON_SECRET"))
                    .build(),
            ),
        );
    }
}

/// Supabase custom access token hook (Standard Webhooks signature).
#[utoipa::path(post, path = "/api/v1/auth/access-token-hook", tag = "auth",
    request_body(content = serde_json::Value, description = "Supabase hook payload: user_id, claims"),
    responses((status = 200, description = "the claims with app_role added", body = serde_json::Value),
              (status = 401, description = "bad or stale signature", body = Problem)))]
#[allow(dead_code)]
fn access_token_hook_doc() {}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1 document", body = serde_json::Value)))]
#[allow(dead_code)]
fn openapi_doc() {}

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    // The document is static; tests/openapi.rs checks every path is in it.
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    truth::complete(&mut doc);
    // A `Value` always serialises.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
});

pub fn document() -> &'static str {
    &DOCUMENT
}

async fn serve() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        document(),
    )
}
