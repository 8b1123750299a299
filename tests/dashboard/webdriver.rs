//! A small W3C WebDriver client over reqwest, driving Debian's chromium through the
//! chromedriver it starts on a free port. Small on purpose: the handful of commands the
//! dashboard tests use, plus chromedriver's browser log (outside the W3C protocol), with no
//! extra HTTP stack to compile.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    client: reqwest::Client,
    session: String,
    driver: Child,
}

#[derive(Clone)]
pub struct Element(String);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless chromium that saves downloads in `downloads`.
    pub async fn start(downloads: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so the chromium it starts goes with it.
            .process_group(0)
            .spawn()
            .expect(
                "chromedriver runs (scripts/ensure-chromium installs chromium and chromium-driver)",
            );
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while client.get(format!("{base}/status")).send().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         "--window-size=1280,1000", "--force-prefers-reduced-motion"],
                "prefs": {"download.default_directory": downloads, "download.prompt_for_download": false},
            },
        }}});
        let response: Value = client
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {response}"))
            .to_owned();
        let browser = Browser {
            client,
            session: format!("{base}/session/{session}"),
            driver,
        };
        browser
            .command(
                "POST",
                "/goog/cdp/execute",
                json!({"cmd": "Browser.setDownloadBehavior",
                       "params": {"behavior": "allow", "downloadPath": downloads}}),
            )
            .await;
        browser
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let request = match method {
            "GET" => self.client.get(&url),
            "DELETE" => self.client.delete(&url),
            _ => self.client.post(&url).json(&body),
        };
        let response: Value = request.send().await.unwrap().json().await.unwrap();
        let value = response["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("WebDriver {method} {path}: {error}: {}", value["message"]);
        }
        value
    }

    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    pub async fn set_window(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await;
    }

    /// Emulates a browser set to prefer a dark (or light) colour scheme.
    pub async fn prefer_dark(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.command(
            "POST",
            "/goog/cdp/execute",
            json!({"cmd": "Emulation.setEmulatedMedia",
                   "params": {"features": [{"name": "prefers-color-scheme", "value": value}]}}),
        )
        .await;
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self
            .command(
                "POST",
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| Element(e[ELEMENT_KEY].as_str().unwrap().to_owned()))
            .collect()
    }

    /// The first element matching `css`, waiting up to `timeout` for one.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let started = Instant::now();
        loop {
            if let Some(element) = self.find_all(css).await.into_iter().next() {
                return element;
            }
            assert!(
                started.elapsed() < timeout,
                "no element {css} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Waits until `script` returns something truthy, and returns it.
    pub async fn wait_until(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self.execute(script, vec![]).await;
            if !(value.is_null() || value == false || value == "" || value == 0) {
                return value;
            }
            assert!(
                started.elapsed() < timeout,
                "not within {timeout:?}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Presses and releases one key (WebDriver's code points: Tab is \u{E004}, Enter \u{E007}).
    pub async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]});
        self.command("POST", "/actions", actions).await;
    }

    pub async fn click(&self, element: &Element) {
        self.command("POST", &format!("/element/{}/click", element.0), json!({}))
            .await;
    }

    /// Clears a text field, then types `text` into it.
    pub async fn type_text(&self, element: &Element, text: &str) {
        self.command("POST", &format!("/element/{}/clear", element.0), json!({}))
            .await;
        self.send_keys(element, text).await;
    }

    /// Types `text`; for a file input, the path of the file to choose.
    pub async fn send_keys(&self, element: &Element, text: &str) {
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn text(&self, element: &Element) -> String {
        let value = self
            .command("GET", &format!("/element/{}/text", element.0), Value::Null)
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    pub async fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        let value = self
            .command(
                "GET",
                &format!("/element/{}/attribute/{name}", element.0),
                Value::Null,
            )
            .await;
        value.as_str().map(str::to_owned)
    }

    pub async fn enabled(&self, element: &Element) -> bool {
        let value = self
            .command(
                "GET",
                &format!("/element/{}/enabled", element.0),
                Value::Null,
            )
            .await;
        value == true
    }

    /// Saves a PNG of the whole page, below the fold too (through the DevTools protocol, as
    /// WebDriver's screenshot is the viewport only).
    pub async fn screenshot(&self, path: &Path) {
        let cdp = |cmd: &str, params: Value| json!({"cmd": cmd, "params": params});
        let metrics = self
            .command(
                "POST",
                "/goog/cdp/execute",
                cdp("Page.getLayoutMetrics", json!({})),
            )
            .await;
        let size = &metrics["cssContentSize"];
        let clip =
            json!({"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1});
        let shot = self
            .command(
                "POST",
                "/goog/cdp/execute",
                cdp(
                    "Page.captureScreenshot",
                    json!({"format": "png", "captureBeyondViewport": true, "clip": clip}),
                ),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// The browser console entries since the last call (chromedriver's log endpoint).
    pub async fn console_log(&self) -> Vec<Value> {
        let value = self
            .command("POST", "/se/log", json!({"type": "browser"}))
            .await;
        value.as_array().cloned().unwrap_or_default()
    }

    pub async fn quit(self) {
        let _ = self.client.delete(&self.session).send().await;
    }
}

impl Drop for Browser {
    /// Ends chromedriver's process group (chromedriver and the browser it started), also
    /// when a test panics.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.driver.id()))
            .status();
        let _ = self.driver.wait();
    }
}
