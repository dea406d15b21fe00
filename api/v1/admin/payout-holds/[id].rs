//! PUT /api/v1/admin/payout-holds/{id} — hold or release a creator's payouts.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::HOLDS)
}
