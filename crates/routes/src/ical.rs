//! iCalendar (RFC 5545) text for the private schedule feed.
//!
//! Times are UTC (`…Z`), so no `VTIMEZONE` is needed and every client
//! shows the right instant in its own zone. UIDs are derived from the
//! event's source (`class-<id>@stagepass.app`), so they never change;
//! `SEQUENCE` is the calendar copy's sequence (bumped on every change), and
//! a cancelled class stays in the feed as `STATUS:CANCELLED` so subscribed
//! calendars remove it. Lines end in CRLF and are folded at 75 octets
//! without splitting a UTF-8 character (RFC 5545 §3.1).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::schedule::{CalendarEvent, CalendarEventStatus};

/// One event of the feed: the schedule's event and when it was made.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FeedEvent {
    #[sqlx(flatten)]
    pub event: CalendarEvent,
    pub created_at: DateTime<Utc>,
    /// The class's own description (may be empty, may hold line breaks).
    pub description: String,
}

/// The domain in every UID.
const UID_DOMAIN: &str = "stagepass.app";
const MAX_LINE_OCTETS: usize = 75;

/// The whole calendar.
pub fn calendar(events: &[FeedEvent]) -> String {
    let mut out = String::with_capacity(256 + events.len() * 400);
    for line in [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//Stagepass//Schedule//EN",
        "CALSCALE:GREGORIAN",
        "METHOD:PUBLISH",
        "X-WR-CALNAME:Stagepass",
        "REFRESH-INTERVAL;VALUE=DURATION:PT1H",
        "X-PUBLISHED-TTL:PT1H",
    ] {
        push_line(&mut out, line);
    }
    for event in events {
        push_event(&mut out, event);
    }
    push_line(&mut out, "END:VCALENDAR");
    out
}

fn push_event(out: &mut String, feed_event: &FeedEvent) {
    let e = &feed_event.event;
    let (status, note) = match (e.status, e.role.as_str()) {
        (CalendarEventStatus::Cancelled, _) => ("CANCELLED", "This class was cancelled."),
        (_, "host") => ("CONFIRMED", "You are hosting this class on Stagepass."),
        _ => ("CONFIRMED", "You are attending this class on Stagepass."),
    };
    push_line(out, "BEGIN:VEVENT");
    push_line(
        out,
        &format!("UID:{}-{}@{UID_DOMAIN}", e.source_kind, e.source_id),
    );
    push_line(out, &format!("DTSTAMP:{}", stamp(e.updated_at)));
    push_line(out, &format!("DTSTART:{}", stamp(e.starts_at)));
    push_line(out, &format!("DTEND:{}", stamp(e.ends_at)));
    push_line(out, &format!("SUMMARY:{}", text(&e.title)));
    // The creator's description first (what the class is), then what it
    // is to this calendar's owner.
    let description = match feed_event.description.trim() {
        "" => note.to_owned(),
        own => format!("{own}\n\n{note}"),
    };
    push_line(out, &format!("DESCRIPTION:{}", text(&description)));
    push_line(out, &format!("SEQUENCE:{}", e.sequence.max(0)));
    push_line(out, &format!("STATUS:{status}"));
    push_line(out, &format!("CREATED:{}", stamp(feed_event.created_at)));
    push_line(out, &format!("LAST-MODIFIED:{}", stamp(e.updated_at)));
    push_line(out, "TRANSP:OPAQUE");
    push_line(out, "END:VEVENT");
}

/// A UTC DATE-TIME (`20261201T180000Z`).
fn stamp(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

/// A TEXT value (RFC 5545 §3.3.11): backslash, semicolon, comma and line
/// breaks escaped; other control characters dropped.
pub fn text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push_str("\\n");
                }
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Appends `line` folded at 75 octets (continuations start with a space,
/// which counts), ended by CRLF.
fn push_line(out: &mut String, line: &str) {
    let mut used = 0;
    let mut limit = MAX_LINE_OCTETS;
    for c in line.chars() {
        if used + c.len_utf8() > limit {
            out.push_str("\r\n ");
            used = 0;
            // The leading space is part of the next line's 75 octets.
            limit = MAX_LINE_OCTETS - 1;
        }
        out.push(c);
        used += c.len_utf8();
    }
    let _ = write!(out, "\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(text(r"a\b;c,d"), r"a\\b\;c\,d");
        assert_eq!(text("one\r\ntwo\nthree\rfour"), r"one\ntwo\nthree\nfour");
        assert_eq!(text("bell\u{7}"), "bell");
    }

    #[test]
    fn long_lines_fold_at_75_octets_without_splitting_characters() {
        let mut out = String::new();
        let long = format!("SUMMARY:{}", "é".repeat(100));
        push_line(&mut out, &long);
        assert!(out.ends_with("\r\n"));
        let lines: Vec<&str> = out.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(lines.len() > 2);
        for (i, l) in lines.iter().enumerate() {
            assert!(l.len() <= 75, "line {i} has {} octets", l.len());
            if i > 0 {
                assert!(l.starts_with(' '));
            }
        }
        let unfolded: String = lines
            .iter()
            .enumerate()
            .map(|(i, l)| if i == 0 { *l } else { &l[1..] })
            .collect();
        assert_eq!(unfolded, long);
    }
}
