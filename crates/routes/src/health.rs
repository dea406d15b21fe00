//! `GET /api/health` (liveness, no I/O) and `GET /api/health/ready` (one
//! database round trip).

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sqlx::PgPool;
use stagepass_platform::config::{DbConfig, Loader};
use stagepass_platform::http::{ApiError, ApiResult, codes};
use stagepass_platform::serve::{Function, Limits, Resources};
use utoipa::ToSchema;

pub const HEALTH: Function = Function {
    name: "health",
    limits: Limits::Exempt("liveness does no I/O"),
    paths: &["/api/health"],
    build: |_, _| Some(Router::new().route("/api/health", get(health))),
};

pub const READY: Function = Function {
    name: "health_ready",
    limits: Limits::Public,
    paths: &["/api/health/ready"],
    build: build_ready,
};

/// How long readiness waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub status: &'static str,
    pub database_latency_ms: f64,
}

/// Liveness: the function runs. Touches nothing else.
#[utoipa::path(get, path = "/api/health", tag = "health",
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

fn build_ready(l: &mut Loader, r: &Resources) -> Option<Router> {
    let pool = r.db(&DbConfig::load(l)?)?;
    Some(
        Router::new()
            .route("/api/health/ready", get(ready))
            .with_state(pool),
    )
}

/// Readiness: the database answers within 2 s.
#[utoipa::path(get, path = "/api/health/ready", tag = "health",
    responses((status = 200, body = Ready),
              (status = 503, description = "database unavailable", body = crate::openapi::Problem)))]
pub async fn ready(State(pool): State<PgPool>) -> ApiResult<Json<Ready>> {
    let started = Instant::now();
    // The simple protocol: one message, no prepared statement, so the probe
    // needs no transaction through a transaction pooler either.
    let probe = sqlx::raw_sql("select 1").execute(&pool);
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(Json(Ready {
            status: "ready",
            database_latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness probe failed");
            Err(unavailable())
        }
        Err(_) => Err(unavailable()),
    }
}

fn unavailable() -> ApiError {
    ApiError::Unavailable(
        codes::DATABASE_UNAVAILABLE,
        "the database did not answer".to_owned(),
    )
}
