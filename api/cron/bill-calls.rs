//! GET /api/cron/bill-calls — the per-minute billing sweep of paid calls (Vercel Cron).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::BILL_CALLS)
}
