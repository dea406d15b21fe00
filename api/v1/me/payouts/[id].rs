//! GET /api/v1/me/payouts/{id} — one payout and its statement.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::ITEM)
}
