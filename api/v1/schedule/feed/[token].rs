//! GET /api/v1/schedule/feed/{token} — the private iCalendar feed.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::schedule::FEED)
}
