//! Time `cloudevents::decode` takes on hostile inputs (the shapes of issue 19: many
//! extension keys, repeated keys, long keys and values, deep nesting) next to a valid event
//! of the same size, and what it answers. Each shape is decoded several times; the median,
//! fastest and slowest are printed as a Markdown table (the one in `FAULTS.md`).
//!
//! `cargo bench -p orchestrator-core --bench hostile_decode [-- <runs> [--max-bytes=<n>]]`
//! (default 5 runs; `--max-bytes` leaves out larger inputs, for a decoder that would take
//! minutes on them)
#![allow(missing_docs, clippy::unwrap_used)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use orchestrator_core::cloudevents;

const MIB: usize = 1 << 20;
/// The attributes of a minimal valid event, without the closing brace.
const HEAD: &str = r#"{"specversion":"1.0","id":"1","source":"s","type":"a.b""#;

/// `HEAD`, then `member(i)` for i = 0, 1, … while the input stays under `size`, then `}`.
fn object(size: usize, member: impl Fn(usize) -> String) -> (Vec<u8>, usize) {
    object_of(size, usize::MAX, member)
}

/// [`object`] of at most `most` members.
fn object_of(size: usize, most: usize, member: impl Fn(usize) -> String) -> (Vec<u8>, usize) {
    let mut text = String::from(HEAD);
    let mut count = 0;
    while count < most {
        let next = member(count);
        if text.len() + next.len() + 2 > size {
            break;
        }
        text.push(',');
        text.push_str(&next);
        count += 1;
    }
    text.push('}');
    (text.into_bytes(), count)
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn shapes() -> Vec<(String, Vec<u8>)> {
    let mut shapes = Vec::new();
    for size in [MIB / 4, MIB, 16 * MIB] {
        let (bytes, n) = object(size, |i| format!(r#""k{i:05}":1"#));
        shapes.push((format!("{n} distinct extension keys"), bytes));
    }
    let (bytes, n) = object(MIB, |i| format!(r#""k{:03}":1"#, i % 256));
    shapes.push((
        format!("256 extension keys, each repeated ({n} members)"),
        bytes,
    ));
    let (bytes, n) = object(MIB, |_| r#""tenant":"acme""#.to_owned());
    shapes.push((format!("one extension key repeated {n} times"), bytes));
    let (bytes, n) = object(MIB, |i| format!(r#""k{i:05}":null"#));
    shapes.push((format!("{n} distinct keys, all null"), bytes));
    let key = "k".repeat(MIB - HEAD.len() - 8);
    shapes.push((
        "one 1 MiB extension name".to_owned(),
        format!(r#"{HEAD},"{key}":1}}"#).into_bytes(),
    ));
    let value = "v".repeat(MIB - HEAD.len() - 16);
    shapes.push((
        "one 1 MiB extension value".to_owned(),
        format!(r#"{HEAD},"tenant":"{value}"}}"#).into_bytes(),
    ));
    let depth = (MIB - HEAD.len() - 16) / 2;
    shapes.push((
        format!("`data` nested {depth} arrays deep"),
        format!(r#"{HEAD},"data":{}}}"#, nested(depth)).into_bytes(),
    ));
    shapes.push((
        format!("an extension nested {depth} arrays deep"),
        format!(r#"{HEAD},"deep":{}}}"#, nested(depth)).into_bytes(),
    ));
    let data = "x".repeat(MIB - HEAD.len() - 64);
    shapes.push((
        "valid: a 1 MiB string payload".to_owned(),
        format!(r#"{HEAD},"datacontenttype":"text/plain","data":"{data}"}}"#).into_bytes(),
    ));
    let (bytes, n) = object_of(MIB, 256, |i| format!(r#""k{i:03}":"{}""#, "v".repeat(4000)));
    shapes.push((format!("valid: {n} extensions of 4000 bytes"), bytes));
    shapes
}

fn outcome(result: &orchestrator_core::Result<orchestrator_core::EventEnvelope>) -> String {
    match result {
        Ok(event) => format!("decoded, {} headers", event.headers().len()),
        Err(error) => {
            let mut text = error.to_string();
            if text.len() > 160 {
                let mut cut = 160;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            format!("refused: {}", text.replace('|', "\\|"))
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5).max(1);
    let max_bytes: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--max-bytes=")?.parse().ok())
        .unwrap_or(usize::MAX);
    let mut table = String::from(
        "| input | bytes | median (ms) | fastest (ms) | slowest (ms) | outcome |\n\
         |---|---:|---:|---:|---:|---|\n",
    );
    for (name, bytes) in shapes() {
        if bytes.len() > max_bytes {
            eprintln!("left out (over --max-bytes): {name}");
            continue;
        }
        let mut times: Vec<Duration> = Vec::with_capacity(runs);
        let mut answer = String::new();
        for _ in 0..runs {
            let started = Instant::now();
            let result = std::hint::black_box(cloudevents::decode(std::hint::black_box(&bytes)));
            times.push(started.elapsed());
            answer = outcome(&result);
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let line = format!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {answer} |",
            bytes.len(),
            ms(times[runs / 2]),
            ms(times[0]),
            ms(times[runs - 1]),
        );
        eprintln!("{line}");
        let _ = writeln!(table, "{line}");
    }
    println!("\n{runs} runs each\n\n{table}");
}
