//! POST /api/webhooks/stripe — Stripe events, each applied exactly once.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::webhooks::STRIPE)
}
