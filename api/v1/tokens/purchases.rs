//! POST /api/v1/tokens/purchases — buy a token package (Stripe PaymentIntent; idempotent).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::purchases::FUNCTION)
}
