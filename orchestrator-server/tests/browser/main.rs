//! The dashboard in a real browser: Debian's Chromium, headless, driven through chromedriver
//! against a live server on the in-memory store. It signs in with the token, watches events
//! published through the orchestrator appear live, filters them, opens one and its trace,
//! reprocesses a dead letter by clicking, until the queue is empty and the handler has the
//! event, and opens a compensated saga. The browser's console must hold no error at the end.
//!
//! Screenshots of each view go to `<target dir>/screenshots/dashboard-*.png` for a person to
//! look at (a failed wait saves `dashboard-failed-*.png` there too).
//!
//! Chromium and chromedriver are `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's
//! `chromium` and `chromium-driver`, which `cargo xtask services up chromium` installs), or
//! the paths in `ORCHESTRATOR_CHROMIUM` / `ORCHESTRATOR_CHROMEDRIVER`. Without them the test
//! is skipped with a printed reason, except under `CI=true`, where it fails.
//!
//! `driver.rs` holds the browser side; this file, the story.
//!
//! The WebDriver client is fantoccini rather than thirtyfour: it talks plain HTTP to the
//! loopback chromedriver through hyper, which the tests already build, with no TLS stack;
//! thirtyfour brings reqwest and turns on serde_json's `preserve_order` for the whole
//! workspace's test build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod driver;

use std::sync::atomic::Ordering;
use std::time::Duration;

use driver::{Chromedriver, Page, WAIT, browser_programs};
use fantoccini::Locator;
use orchestrator::prelude::*;
use serde_json::{Value, json};
use support::{Billing, TOKEN, config, start};

/// A function of a CSS selector: whether every element it selects shows all its text (none
/// cut by `overflow: hidden` and an ellipsis).
const UNCUT: &str = "(css => Array.from(document.querySelectorAll(css)).every(e => e.scrollWidth <= e.clientWidth))";

/// The type of each row of the live table, top (newest) first.
const LIVE_TYPES: &str = "Array.from(document.querySelectorAll('#live-rows tr td:nth-child(3)')).map(td => td.textContent)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    let orchestrator = EventOrchestrator::new();

    // Stored before the page opens: the page catches up on them.
    for (event_type, data) in [
        ("user.created", json!({"user": "ada"})),
        ("user.created", json!({"user": "grace"})),
        ("inventory.reserved", json!({"sku": "B-42", "quantity": 2})),
    ] {
        orchestrator.publish_event(event_type, data).await.unwrap();
    }

    let server = start(orchestrator.clone(), config()).await;
    let temp = tempfile::tempdir().unwrap();
    let driver = Chromedriver::start(&chromedriver, &temp.path().join("chromedriver.log"));
    let mut page = Page::open(
        &chromium,
        &driver,
        &temp.path().join("profile"),
        format!("http://{}/", server.addr),
    )
    .await;

    sign_in(&mut page).await;
    let (placed, correlation) = live_events(&orchestrator, &mut page).await;
    event_and_trace(&mut page, &placed, correlation).await;
    dead_letter_reprocessed_by_a_click(&orchestrator, &mut page).await;
    compensated_saga(&orchestrator, &mut page).await;

    // Back to the live view, for the picture of the whole.
    page.click("nav.tabs a[data-view=live]").await;
    page.wait(
        "the live view",
        &format!("!document.getElementById('view-live').hidden && {LIVE_TYPES}.includes('invoice.requested')"),
        vec![],
    )
    .await;
    page.screenshot("overview").await;

    // Nothing went wrong in the page. The one expected error: the first request, sent
    // before the token was given, was refused (401) — which also shows the log is read.
    let console = page.read_console().await;
    let refused = |entry: &Value| {
        entry["message"]
            .as_str()
            .is_some_and(|m| m.contains("/graphql") && m.contains("401"))
    };
    assert!(
        console.iter().any(refused),
        "the refused first request in the console: {console:#?}"
    );
    let errors: Vec<Value> = console
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .filter(|entry| !refused(entry))
        .collect();
    assert!(
        errors.is_empty(),
        "errors in the browser's console: {errors:#?}"
    );

    page.client.close().await.unwrap();
    drop(driver);
}

/// The server needs a token: the page asks for it, and shows the stream once it has it.
async fn sign_in(page: &mut Page) {
    page.client.goto(&page.base).await.unwrap();
    assert_eq!(
        page.client.title().await.unwrap(),
        "orchestrator · dashboard"
    );
    page.wait(
        "the sign-in dialog",
        "document.getElementById('login').open",
        vec![],
    )
    .await;
    page.screenshot("sign-in").await;
    page.client
        .find(Locator::Id("login-token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    page.click("#login-form button[type=submit]").await;
    page.wait(
        "the live stream to connect",
        "document.querySelector('#connection.live')",
        vec![],
    )
    .await;
    page.wait(
        "the events stored before the page opened",
        &format!("{LIVE_TYPES}.join() === 'inventory.reserved,user.created,user.created'"),
        vec![],
    )
    .await;
    page.wait(
        "the header to name the store",
        "document.getElementById('status').textContent.includes('Store')",
        vec![],
    )
    .await;
}

/// A request published while the page is open appears live, newest on top; more events fill
/// the key numbers and the chart; a type pattern filters the stream. Returns the request's
/// first event and its correlation id.
async fn live_events(
    orchestrator: &EventOrchestrator,
    page: &mut Page,
) -> (EventEnvelope, &'static str) {
    // A request published while the page is open: an order placed, paid because of it,
    // shipped because of the payment. They appear live, newest on top.
    let correlation = "checkout-7f3a";
    let placed = EventEnvelope::new("order.placed", &json!({"order": 7, "total": 99.5}))
        .unwrap()
        .with_correlation_id(correlation);
    let paid = EventEnvelope::new("payment.captured", &json!({"order": 7, "amount": 99.5}))
        .unwrap()
        .with_correlation_id(correlation)
        .with_causation_id(placed.id().as_str());
    let shipped = EventEnvelope::new("order.shipped", &json!({"order": 7, "carrier": "DHL"}))
        .unwrap()
        .with_correlation_id(correlation)
        .with_causation_id(paid.id().as_str());
    for event in [&placed, &paid, &shipped] {
        orchestrator.publish(event.clone()).await.unwrap();
    }
    page.wait(
        "the request's three events, live",
        &format!(
            "{LIVE_TYPES}.slice(0, 3).join() === 'order.shipped,payment.captured,order.placed'"
        ),
        vec![],
    )
    .await;
    // A few more, over a couple of seconds, so the throughput chart has something to show.
    for n in 0..12_u32 {
        let event_type = ["order.placed", "user.created", "inventory.reserved"][n as usize % 3];
        orchestrator
            .publish_event(event_type, json!({"n": n}))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    page.wait(
        "every event in the table",
        &format!("{LIVE_TYPES}.length === 18"),
        vec![],
    )
    .await;
    page.wait(
        "the store head in the key numbers",
        "document.getElementById('kpi-head').textContent === '18'",
        vec![],
    )
    .await;
    page.wait(
        "bars in the throughput chart",
        "document.querySelectorAll('#chart rect.bar[height]:not([height=\"0.00\"])').length > 0",
        vec![],
    )
    .await;
    page.screenshot("live").await;

    // A type pattern narrows the stream to the orders.
    let filter = page.client.find(Locator::Id("filter")).await.unwrap();
    filter.send_keys("order.*").await.unwrap();
    page.click("#filter-form button[type=submit]").await;
    page.wait(
        "only orders after filtering",
        &format!("{LIVE_TYPES}.length === 6 && {LIVE_TYPES}.every(t => t.startsWith('order.'))"),
        vec![],
    )
    .await;
    page.screenshot("live-filtered").await;
    filter.clear().await.unwrap();
    page.click("#filter-form button[type=submit]").await;
    page.wait(
        "every event again without the filter",
        &format!("{LIVE_TYPES}.length === 18"),
        vec![],
    )
    .await;

    (placed, correlation)
}

/// One event: its detail in the drawer, then its trace, each event under its cause.
async fn event_and_trace(page: &mut Page, placed: &EventEnvelope, correlation: &str) {
    // A click on its type: its correlation cell is a link of its own, to the trace.
    let placed_cell = format!(
        "//tbody[@id='live-rows']/tr[td[5]/a/@title='{correlation}'][td[3]='order.placed']/td[3]"
    );
    page.click_on(
        Locator::XPath(&placed_cell),
        "the order placed in the table",
    )
    .await;
    page.wait(
        "the event's detail",
        "!document.getElementById('drawer').hidden && \
         document.getElementById('drawer-body').textContent.includes(arguments[0]) && \
         document.getElementById('drawer-body').textContent.includes('specversion')",
        vec![json!(placed.id().as_str())],
    )
    .await;
    assert_eq!(
        page.eval(
            "document.getElementById('drawer-title').textContent",
            vec![]
        )
        .await,
        "order.placed"
    );
    page.screenshot("event-detail").await;
    page.click("#drawer-body a.button").await;
    page.wait(
        "the trace of the request",
        "!document.getElementById('view-trace').hidden && \
         document.querySelectorAll('#trace-out .wf-row:not(.wf-head)').length === 3",
        vec![],
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('drawer').hidden", vec![])
            .await,
        true,
        "the drawer closes on the way to the trace"
    );
    let rows = page
        .eval(
            "Array.from(document.querySelectorAll('#trace-out .wf-row:not(.wf-head) .wf-label'))\
             .map(label => [label.querySelector('.type').textContent, label.querySelector('.elbow') !== null])",
            vec![],
        )
        .await;
    assert_eq!(
        rows,
        json!([
            ["order.placed", false],
            ["payment.captured", true],
            ["order.shipped", true],
        ]),
        "each event under its cause"
    );
    assert_eq!(
        page.eval("document.getElementById('trace-id').value", vec![])
            .await,
        correlation
    );
    page.wait(
        "the trace's labels and times uncut",
        &format!("{UNCUT}('#trace-out .wf-label, #trace-out .wf-time')"),
        vec![],
    )
    .await;
    page.screenshot("trace").await;
}

/// A handler that fails for good dead-letters an event; the page shows it, and a click on
/// Reprocess, once the handler is healthy, delivers it and empties the queue.
async fn dead_letter_reprocessed_by_a_click(orchestrator: &EventOrchestrator, page: &mut Page) {
    let mut billing = Billing::subscribe(
        orchestrator,
        SubscriptionConfig::new("invoice.requested").named("billing"),
        "the billing service answered 503 Service Unavailable",
    )
    .await;
    let invoice = orchestrator
        .publish_event("invoice.requested", json!({"order": 7}))
        .await
        .unwrap();
    page.wait(
        "the dead letter's count on the tab",
        "!document.getElementById('dlq-count').hidden && \
         document.getElementById('dlq-count').textContent === '1'",
        vec![],
    )
    .await;
    page.click("nav.tabs a[data-view=dlq]").await;
    page.wait(
        "the dead letter in the queue",
        "document.querySelectorAll('#dlq-rows tr').length === 1 && \
         document.querySelector('#dlq-rows tr').textContent.includes('invoice.requested') && \
         document.querySelector('#dlq-rows tr').textContent.includes('billing')",
        vec![],
    )
    .await;
    page.click("#dlq-rows tr td.reason").await;
    page.wait(
        "the dead letter's detail",
        "document.getElementById('dlq-detail').textContent.includes('503 Service Unavailable') && \
         document.getElementById('dlq-detail').textContent.includes(arguments[0])",
        vec![json!(invoice.as_str())],
    )
    .await;
    page.wait(
        "the dead letters' table to fit beside the detail, buttons in view",
        "(w => w.scrollWidth <= w.clientWidth)(document.querySelector('#view-dlq .table-wrap'))",
        vec![],
    )
    .await;
    page.screenshot("dead-letters").await;

    // The billing service is back: reprocess by clicking.
    billing.healthy.store(true, Ordering::SeqCst);
    page.click("#dlq-rows tr button.primary").await;
    page.wait(
        "the queue to empty",
        "document.querySelectorAll('#dlq-rows tr').length === 0 && \
         !document.getElementById('dlq-empty').hidden",
        vec![],
    )
    .await;
    let delivered = tokio::time::timeout(WAIT, billing.handled.recv())
        .await
        .expect("the reprocessed event reaches the handler")
        .unwrap();
    assert_eq!(delivered, invoice);
    assert!(
        orchestrator.dead_letters().count().await.unwrap() == 0,
        "the queue is empty in the orchestrator too"
    );
    page.wait(
        "the DLQ depth back to 0",
        "document.getElementById('kpi-dlq').textContent === '0' && \
         document.getElementById('dlq-count').hidden",
        vec![],
    )
    .await;
    page.screenshot("dead-letters-empty").await;
}

/// A checkout saga whose payment is declined is compensated: its steps and timeline.
async fn compensated_saga(orchestrator: &EventOrchestrator, page: &mut Page) {
    orchestrator
        .define_saga(
            "checkout",
            vec![
                SagaStep::new("reserve_stock", support::reserve)
                    .with_compensation(support::release),
                SagaStep::new("charge_card", support::charge),
            ],
        )
        .unwrap();
    let saga = orchestrator
        .start_saga("checkout", json!({"order": 7}))
        .await
        .unwrap();
    assert_eq!(saga.status, SagaStatus::Compensated);
    page.click("nav.tabs a[data-view=sagas]").await;
    page.wait(
        "the saga in the list",
        "document.querySelectorAll('#saga-rows tr').length === 1 && \
         document.querySelector('#saga-rows tr').textContent.includes('compensated')",
        vec![],
    )
    .await;
    page.click("#saga-rows tr").await;
    page.wait(
        "the saga's steps and timeline",
        "document.querySelector('#saga-detail .step.compensated')?.textContent === 'reserve_stock' && \
         document.querySelector('#saga-detail .step.failed')?.textContent === 'charge_card' && \
         document.getElementById('saga-detail').textContent.includes('card declined') && \
         document.querySelectorAll('#saga-detail .wf-row:not(.wf-head)').length >= 4",
        vec![],
    )
    .await;
    page.wait(
        "the saga timeline's labels and times uncut",
        &format!("{UNCUT}('#saga-detail .wf-label, #saga-detail .wf-time')"),
        vec![],
    )
    .await;
    page.screenshot("saga").await;
}
