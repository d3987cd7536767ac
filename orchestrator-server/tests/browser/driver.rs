//! The browser side of the test: Chromium and chromedriver found (or the test skipped), a
//! chromedriver of the test's own, and the page with the waits, clicks and screenshots the
//! story needs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// How long any one thing may take to show in the page.
pub(crate) const WAIT: Duration = Duration::from_secs(30);
/// The window, and so the screenshots.
const WINDOW: (u32, u32) = (1440, 1000);

/// Whether we run under CI, where a missing browser fails the test instead of skipping it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `$variable`, else `default`.
fn program(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable)
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Chromium and chromedriver, when both are installed. Outside CI a missing one skips the
/// test with the reason printed; under CI it fails it.
pub(crate) fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let chromium = program("ORCHESTRATOR_CHROMIUM", "/usr/bin/chromium");
    let chromedriver = program("ORCHESTRATOR_CHROMEDRIVER", "/usr/bin/chromedriver");
    let missing: Vec<String> = [&chromium, &chromedriver]
        .into_iter()
        .filter(|path| !path.is_file())
        .map(|path| path.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some((chromium, chromedriver));
    }
    let why = format!(
        "{} not found: install Debian's chromium and chromium-driver (`cargo xtask services up \
         chromium` does), or point ORCHESTRATOR_CHROMIUM / ORCHESTRATOR_CHROMEDRIVER at them",
        missing.join(" and ")
    );
    assert!(!in_ci(), "the dashboard's browser test cannot run: {why}");
    eprintln!("skipping the dashboard's browser test: {why}");
    None
}

/// Where screenshots go: `<target dir>/screenshots`, the target dir found from this test's
/// own executable (`<target dir>/debug/deps/browser-…`), so `CARGO_TARGET_DIR` and
/// `build.target-dir` both count.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver of this test's own on a free loopback port, in a process group of its own
/// (with the browsers it starts): killed, group and all, when dropped.
pub(crate) struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    /// Starts chromedriver and waits until it accepts connections; its output goes to
    /// `log`.
    pub(crate) fn start(program: &Path, log: &Path) -> Self {
        // Free now; chromedriver binds it a moment later. Another process taking the port in
        // between would fail the readiness wait below with chromedriver's own message.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let output = std::fs::File::create(log).unwrap();
        let mut command = Command::new(program);
        command
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut driver = Self { child, port };
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = driver.child.try_wait().unwrap() {
                panic!(
                    "chromedriver exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < WAIT,
                "chromedriver listens on {addr} within {WAIT:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group is chromedriver's pid (`process_group(0)`): Chromium goes with it, even
        // when a failed test never closed its session.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's console log of the page (`POST /session/{id}/se/log`): not in the W3C
/// protocol, so not in fantoccini's API.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (hyper::Method, Option<String>) {
        (
            hyper::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// The browser, on the dashboard, with the helpers the story needs.
pub(crate) struct Page {
    pub(crate) client: Client,
    pub(crate) base: String,
    shots: PathBuf,
    /// Console entries read so far (reading the log empties it).
    console: Vec<Value>,
}

impl Page {
    /// A headless Chromium with a fresh profile in `profile`, through `driver`.
    pub(crate) async fn open(
        chromium: &Path,
        driver: &Chromedriver,
        profile: &Path,
        base: String,
    ) -> Self {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                    "--force-device-scale-factor=1",
                    "--no-first-run",
                    "--lang=en-US",
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| panic!("a Chromium session through chromedriver: {e}"));
        Self {
            client,
            base,
            shots: screenshot_dir(),
            console: Vec::new(),
        }
    }

    /// Polls `condition`, a JavaScript expression (its arguments in `args`, as `arguments[i]`),
    /// until it is true. After [`WAIT`]: a screenshot, the console, and a panic saying `what`.
    pub(crate) async fn wait(&mut self, what: &str, condition: &str, args: Vec<Value>) {
        let script = format!("return Boolean({condition});");
        let started = Instant::now();
        loop {
            let value = self
                .client
                .execute(&script, args.clone())
                .await
                .unwrap_or_else(|e| panic!("{what}: running `{condition}`: {e}"));
            if value == Value::Bool(true) {
                return;
            }
            if started.elapsed() > WAIT {
                let name = format!(
                    "failed-{}",
                    what.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                );
                self.screenshot(&name).await;
                let console = self.read_console().await;
                panic!(
                    "waited {WAIT:?} for {what} (`{condition}`); screenshot \
                     dashboard-{name}.png in {}; the console: {console:#?}",
                    self.shots.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a JavaScript expression.
    pub(crate) async fn eval(&self, expression: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(&format!("return ({expression});"), args)
            .await
            .unwrap_or_else(|e| panic!("`{expression}`: {e}"))
    }

    /// Clicks the element `css` selects.
    pub(crate) async fn click(&self, css: &str) {
        self.click_on(Locator::Css(css), css).await;
    }

    /// Clicks the element `locator` finds (`what` names it in failures). The page re-renders
    /// its tables as data arrives (live events, the dead letters' poll), so an element found
    /// may be replaced before the click reaches it: a stale element is looked up again, for
    /// up to 10 s.
    pub(crate) async fn click_on(&self, locator: Locator<'_>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let element = self
                .client
                .find(locator)
                .await
                .unwrap_or_else(|e| panic!("an element `{what}`: {e}"));
            match element.click().await {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("a click on `{what}`: {e}"),
            }
        }
    }

    /// Saves the window as `dashboard-{name}.png`.
    pub(crate) async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let path = self.shots.join(format!("dashboard-{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// Every console entry so far.
    pub(crate) async fn read_console(&mut self) -> Vec<Value> {
        match self.client.issue_cmd(BrowserLog).await {
            Ok(Value::Array(entries)) => self.console.extend(entries),
            other => panic!("the browser's console log: {other:?}"),
        }
        self.console.clone()
    }
}
