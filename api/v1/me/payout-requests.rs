//! POST /api/v1/me/payout-requests — pay me in the next cycle.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::REQUESTS)
}
