//! POST /api/v1/schedule/feed-token — a new private feed URL (the old one stops working).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::schedule::FEED_TOKEN)
}
