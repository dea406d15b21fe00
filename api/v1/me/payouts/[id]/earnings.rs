//! GET /api/v1/me/payouts/{id}/earnings — the period's earnings as CSV.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::EARNINGS)
}
