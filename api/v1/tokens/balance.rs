//! GET /api/v1/tokens/balance — the caller's balance and spending position.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::tokens::BALANCE_FUNCTION)
}
