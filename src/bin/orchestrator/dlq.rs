//! `dlq list|show|reprocess|discard`.
//!
//! Dead letters live where the transport parks them: a broker's queue, or — in embedded mode
//! (`--store file://DIR` with the in-process transport `memory:`) — the files of
//! `DIR/dead-letters`, which this command reads and edits directly, without opening the
//! store, so it works while the application runs. Through `--server`, the server's
//! orchestrator does it all, reprocessing included: it runs inside the application.

use std::path::Path;

use clap::Subcommand;
use orchestrator::core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Error as CoreError};
use orchestrator::store::FileDeadLetterQueue;
use serde_json::{Value, json};

use crate::output::{event_json, payload, print_json, shorten, time};
use crate::remote::{self, Server};
use crate::{Access, CliResult, Context};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first (in embedded mode, those in DIR/dead-letters).
    List {
        /// Only letters of this event type.
        #[arg(long)]
        event_type: Option<String>,
        /// Only letters of this subscription (consumer group).
        #[arg(long)]
        subscription: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter: why it failed, how often, and its event.
    Show {
        /// The dead letter's id.
        id: String,
    },
    /// Deliver a dead letter's event again to the subscription that failed it, and remove
    /// the letter.
    ///
    /// In embedded mode (--store file://DIR, --transport memory:) this refuses and keeps
    /// the letter: the subscription lives inside the application's process, which this
    /// command is not part of. Appending the event to the store again would not help: the
    /// relay would publish it to every subscription of its type, not only the one that
    /// failed, and store it twice. Reprocess from the application
    /// (`orchestrator.dead_letters().reprocess(id)`), or discard the letter here. Through
    /// --server it works: the server runs inside the application.
    Reprocess {
        /// The dead letter's id.
        id: String,
    },
    /// Remove a dead letter for good.
    Discard {
        /// The dead letter's id.
        id: String,
    },
}

pub(crate) async fn run(cx: &Context, command: DlqCommand) -> CliResult {
    if let Some(server) = &cx.server {
        return through(cx, server, command).await;
    }
    if let Some(store_dir) = cx.embedded_store_dir()? {
        return embedded(cx, &store_dir, command).await;
    }
    if cx.in_process_transport() && !cx.json {
        eprintln!(
            "note: dead letters live in the transport, and memory: lives only as long as this \
             command; pass --store file://DIR for an embedded application's, or --transport \
             redis://…, amqp://… or kafka://… to see a broker's"
        );
    }
    let orchestrator = cx.connect(false, Access::Read).await?;
    let dead_letters = orchestrator.dead_letters();
    match command {
        DlqCommand::List {
            event_type,
            subscription,
            limit,
        } => {
            let letters = dead_letters
                .list(&DeadLetterQuery {
                    event_type,
                    subscription,
                    offset: 0,
                    limit,
                })
                .await?;
            print_list(cx, &letters)?;
        }
        DlqCommand::Show { id } => {
            let letter = dead_letters.inspect(&id).await?;
            print_letter(cx, &letter)?;
        }
        DlqCommand::Reprocess { id } => {
            dead_letters.reprocess(&id).await?;
            report(cx, "reprocessed", &id)?;
        }
        DlqCommand::Discard { id } => {
            dead_letters.discard(&id).await?;
            report(cx, "discarded", &id)?;
        }
    }
    Ok(())
}

/// The dead letters of an embedded application on the store in `store_dir`: the files of
/// `store_dir/dead-letters`, read (and, to discard, edited) in place.
async fn embedded(cx: &Context, store_dir: &Path, command: DlqCommand) -> CliResult {
    let dir = FileDeadLetterQueue::dir_in_store(store_dir);
    let reader = FileDeadLetterQueue::open_read_only(&dir);
    match command {
        DlqCommand::List {
            event_type,
            subscription,
            limit,
        } => {
            let query = DeadLetterQuery {
                event_type,
                subscription,
                offset: 0,
                limit,
            };
            print_list(cx, &reader.list(&query).await?)
        }
        DlqCommand::Show { id } => print_letter(cx, &find(&reader, &id).await?),
        DlqCommand::Reprocess { id } => {
            let letter = find(&reader, &id).await?;
            Err(refuse_reprocess(store_dir, &letter).into())
        }
        DlqCommand::Discard { id } => {
            // Attached, not opened: the application may be writing a letter right now, and
            // opening would clean up its temporary file.
            FileDeadLetterQueue::attach(&dir)
                .remove(&id)
                .await?
                .ok_or_else(|| not_found(&id))?;
            report(cx, "discarded", &id)
        }
    }
}

/// The fields of a `DeadLetter` that [`letter`] reads.
const LETTER_FIELDS: &str = "id topic subscription reason attempts firstFailureAt \
                             lastFailureAt event { cloudEvent }";

/// How many letters one `deadLetters` query asks for (under every server's page cap).
const LETTER_PAGE: usize = 100;

/// The dead letters of the server's orchestrator, through its API.
async fn through(cx: &Context, server: &Server, command: DlqCommand) -> CliResult {
    match command {
        DlqCommand::List {
            event_type,
            subscription,
            limit,
        } => {
            let query = format!(
                "query($type: String, $subscription: String, $offset: Int, $first: Int) {{ \
                 deadLetters(eventType: $type, subscription: $subscription, offset: $offset, \
                 first: $first) {{ {LETTER_FIELDS} }} }}"
            );
            let mut letters = Vec::new();
            while letters.len() < limit {
                let first = (limit - letters.len()).min(LETTER_PAGE);
                let data = server
                    .query(
                        &query,
                        json!({
                            "type": event_type,
                            "subscription": subscription,
                            "offset": letters.len(),
                            "first": first,
                        }),
                    )
                    .await?;
                let page = remote::list(server, &data, "deadLetters")?;
                for value in page {
                    letters.push(letter(server, value)?);
                }
                if page.len() < first {
                    break;
                }
            }
            print_list(cx, &letters)
        }
        DlqCommand::Show { id } => {
            let data = server
                .query(
                    &format!("query($id: String!) {{ deadLetter(id: $id) {{ {LETTER_FIELDS} }} }}"),
                    json!({ "id": id }),
                )
                .await?;
            match remote::field(server, &data, "deadLetter")? {
                Value::Null => Err(not_found(&id).into()),
                value => print_letter(cx, &letter(server, value)?),
            }
        }
        DlqCommand::Reprocess { id } => {
            change(cx, server, "reprocessDeadLetter", "reprocessed", &id).await
        }
        DlqCommand::Discard { id } => {
            change(cx, server, "discardDeadLetter", "discarded", &id).await
        }
    }
}

/// Runs `mutation` on the dead letter `id` through the server, and reports it `done`.
async fn change(cx: &Context, server: &Server, mutation: &str, done: &str, id: &str) -> CliResult {
    server
        .query(
            &format!("mutation($id: String!) {{ {mutation}(id: $id) {{ id }} }}"),
            json!({ "id": id }),
        )
        .await?;
    report(cx, done, id)
}

/// A dead letter of the API (selected with [`LETTER_FIELDS`]).
fn letter(server: &Server, value: &Value) -> CliResult<DeadLetter> {
    let attempts = remote::number(server, value, "attempts")?;
    Ok(DeadLetter {
        id: remote::text(server, value, "id")?.to_owned(),
        event: remote::event(server, remote::field(server, value, "event")?)?,
        topic: remote::text(server, value, "topic")?.to_owned(),
        subscription: remote::text(server, value, "subscription")?.to_owned(),
        reason: remote::text(server, value, "reason")?.to_owned(),
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        first_failure_at: remote::time(server, value, "firstFailureAt")?,
        last_failure_at: remote::time(server, value, "lastFailureAt")?,
    })
}

/// Why the CLI does not reprocess an embedded application's dead letter, and what to do.
fn refuse_reprocess(store_dir: &Path, letter: &DeadLetter) -> String {
    format!(
        "cannot reprocess dead letter `{id}` from here: with --store file://{dir} and the \
         in-process transport, subscription `{sub}` lives inside the application's process, \
         which this command is not part of (storing the event again would publish it to \
         every subscription of `{event_type}`, not only `{sub}`). The letter is kept. \
         Reprocess it from the application once `{sub}` is subscribed — \
         orchestrator.dead_letters().reprocess(\"{id}\") — or drop it with \
         `orchestrator --store file://{dir} dlq discard {id}`",
        id = letter.id,
        dir = store_dir.display(),
        sub = letter.subscription,
        event_type = letter.event.event_type(),
    )
}

async fn find(queue: &FileDeadLetterQueue, id: &str) -> CliResult<DeadLetter> {
    Ok(queue.get(id).await?.ok_or_else(|| not_found(id))?)
}

fn not_found(id: &str) -> CoreError {
    CoreError::NotFound {
        what: format!("dead letter `{id}`"),
    }
}

fn print_list(cx: &Context, letters: &[DeadLetter]) -> CliResult {
    if cx.json {
        let letters = letters
            .iter()
            .map(letter_json)
            .collect::<CliResult<Vec<_>>>()?;
        return print_json(&Value::Array(letters));
    }
    if letters.is_empty() {
        println!("no dead letters");
    }
    for letter in letters {
        println!(
            "{} {} {} attempts={} subscription={} reason={}",
            letter.id,
            time(letter.last_failure_at),
            letter.event.event_type(),
            letter.attempts,
            letter.subscription,
            shorten(&letter.reason, 120)
        );
    }
    Ok(())
}

fn print_letter(cx: &Context, letter: &DeadLetter) -> CliResult {
    if cx.json {
        return print_json(&letter_json(letter)?);
    }
    println!("dead letter   {}", letter.id);
    println!("subscription  {}", letter.subscription);
    println!("topic         {}", letter.topic);
    println!("reason        {}", letter.reason);
    println!("attempts      {}", letter.attempts);
    println!("first failure {}", time(letter.first_failure_at));
    println!("last failure  {}", time(letter.last_failure_at));
    println!(
        "event         {} {}",
        letter.event.event_type(),
        letter.event.id()
    );
    println!("payload       {}", payload(&letter.event));
    Ok(())
}

fn report(cx: &Context, what: &str, id: &str) -> CliResult {
    if cx.json {
        print_json(&json!({ what: id }))
    } else {
        println!("{what} {id}");
        Ok(())
    }
}

fn letter_json(letter: &DeadLetter) -> CliResult<Value> {
    Ok(json!({
        "id": letter.id,
        "subscription": letter.subscription,
        "topic": letter.topic,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "first_failure_at": time(letter.first_failure_at),
        "last_failure_at": time(letter.last_failure_at),
        "event": event_json(&letter.event)?,
    }))
}
