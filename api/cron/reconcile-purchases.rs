//! GET /api/cron/reconcile-purchases — Vercel Cron: ask Stripe about stale pending purchases.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::RECONCILE_PURCHASES)
}
