//! `NOSCRIPT` recovery after `SCRIPT FLUSH` (its own test binary: the flush
//! empties Redis's script cache for everyone, which would make the exact
//! round-trip counts of the other limiter tests racy).

mod ratelimit_support;

use ratelimit_support::{Shim, at, limiter, new_user};
use stagepass_platform::ratelimit::policies::{AUTHENTICATED_API, BURST, MONEY_BASIC};
use stagepass_platform::upstash::{Command, Reply};

#[tokio::test]
async fn the_limiter_recovers_from_a_flushed_script_cache() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = limiter(client.clone());
    let policies = [BURST, MONEY_BASIC, AUTHENTICATED_API];
    let u = new_user();
    assert!(limiter.decide(&policies, &u, at(0)).await.unwrap().allowed);

    let flushed = client
        .command(&Command::new("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    assert_eq!(flushed, Reply::Text("OK".into()));

    // EVALSHA → NOSCRIPT → EVAL: two round trips, and the answer is right.
    let before = (client.round_trips(), shim.requests());
    let d = limiter.decide(&policies, &u, at(10)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits[0].remaining, 0, "the second burst token");
    assert_eq!(client.round_trips() - before.0, 2);
    assert_eq!(shim.requests() - before.1, 2);

    // EVAL cached the script again: back to one round trip.
    let before = client.round_trips();
    let d = limiter
        .decide(&policies, &new_user(), at(20))
        .await
        .unwrap();
    assert!(d.allowed);
    assert_eq!(client.round_trips() - before, 1);
}
