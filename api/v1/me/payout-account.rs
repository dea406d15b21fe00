//! GET|POST /api/v1/me/payout-account — the creator's payout account; a fresh onboarding link.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::ACCOUNT)
}
