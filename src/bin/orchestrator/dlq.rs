//! `dlq list|show|reprocess|discard`.

use clap::Subcommand;
use orchestrator::core::{DeadLetter, DeadLetterQuery};
use serde_json::{Value, json};

use crate::output::{event_json, payload, print_json, shorten, time};
use crate::{Access, CliResult, Context};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first.
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
    if cx.in_process_transport() && !cx.json {
        eprintln!(
            "note: dead letters live in the transport, and memory: lives only as long as this \
             command; pass --transport redis://…, amqp://… or kafka://… to see a broker's"
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
            for letter in &letters {
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
        }
        DlqCommand::Show { id } => {
            let letter = dead_letters.inspect(&id).await?;
            if cx.json {
                return print_json(&letter_json(&letter)?);
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
