//! GET /api/v1/tokens/ledger — the caller's ledger entries.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::tokens::LEDGER_FUNCTION)
}
