//! POST /api/webhooks/stripe-connect — events of connected accounts.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::CONNECT_WEBHOOK)
}
