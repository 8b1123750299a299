//! The web dashboard in a real browser (Debian's chromium over WebDriver) against a real
//! server on a random port, training with the real planner and executor (paced so a person, or
//! a test, can watch): the key, the jobs table, a job's live loss chart, its plan, pause and
//! resume, a checkpoint download, the new-job form with its plan preview and field messages, a
//! job that does not fit, the cluster, dark and phone-width layouts, a dropped connection,
//! another tenant; no console errors. Screenshots go to target/dashboard-screenshots/.

mod common;
#[path = "dashboard/paced.rs"]
mod paced;
#[path = "dashboard/proxy.rs"]
mod proxy;
#[path = "dashboard/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chronospipe::jobs::Capabilities;
use common::{KEY, TestServer};
use paced::Paced;
use proxy::CuttingProxy;
use serde_json::{Value, json};
use webdriver::Browser;

const STEPS: u64 = 60;
const WAIT: Duration = Duration::from_secs(30);
const PROBE: &str = "console-probe-from-the-test";

fn body(train: &str, steps: u64) -> Value {
    json!({
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 48, "vocab_size": 256, "init": {"seed": 3}},
        "data": {"train": train},
        "training": {"seq_len": 16, "micro_batch_size": 1, "microbatches": 2, "steps": steps,
                     "checkpoint_every": 10, "optimizer": {"kind": "adamw", "lr": 0.003}},
        "parallelism": {"stages": 2, "schedule": "chronos"}
    })
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots")
}

async fn points(browser: &Browser) -> i64 {
    let chart = browser.wait_for("[data-testid=loss-chart]", WAIT).await;
    let points = browser.attribute(&chart, "data-points").await.unwrap();
    points.parse().unwrap()
}

async fn status_is(browser: &Browser, status: &str) {
    browser
        .wait_until(
            &format!("the job is {status}"),
            &format!(
                "return document.querySelector('.job-head [data-testid=job-status]')?.textContent === '{status}'"
            ),
            WAIT,
        )
        .await;
}

/// Sets the new-job editor's text as typing would (an input event).
async fn set_editor(browser: &Browser, text: &str) {
    browser
        .execute(
            "const e = document.querySelector('[data-testid=job-editor]'); e.value = arguments[0]; \
             e.dispatchEvent(new Event('input'));",
            vec![json!(text)],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_follows_a_job_in_a_real_browser() {
    let db = common::TestDb::sqlite().await;
    // Slow, and held halfway until it is paused, however slow the browser is; then quick to
    // the end.
    let pace = Paced::new(Duration::from_millis(150), STEPS / 2);
    let capabilities = Capabilities {
        planner: Capabilities::production().planner,
        runner: Some(Arc::new(pace.clone())),
    };
    let server = TestServer::start_with(&db.url, capabilities, |_| {}).await;
    // The browser reaches the server through a relay that can drop its connections.
    let proxy = CuttingProxy::start(server.base.trim_start_matches("http://").to_owned()).await;
    let downloads = tempfile::tempdir().unwrap();
    let shots = screenshots();
    let browser = Browser::start(downloads.path()).await;

    // The key: a wrong one is refused in words, the right one opens the jobs page.
    browser.goto(&proxy.url("/")).await;
    let key = browser.wait_for("[data-testid=key-input]", WAIT).await;
    // Proves the console is read: this entry must come back at the end.
    browser
        .execute("console.error(arguments[0])", vec![json!(PROBE)])
        .await;
    browser.screenshot(&shots.join("key.png")).await;
    browser.type_text(&key, "cp_wrong\n").await;
    let error = browser
        .wait_for("[data-testid=key-error]:not(:empty)", WAIT)
        .await;
    assert!(
        browser.text(&error).await.contains("refused"),
        "{}",
        browser.text(&error).await
    );
    browser.type_text(&key, &format!("{KEY}\n")).await;
    browser.wait_for("[data-testid=status-filter]", WAIT).await;

    // A running job appears in the table.
    let corpus = "Memory is a small fast cache; keep what is used soon, move the rest. ".repeat(20);
    let train = server
        .upload("train", "corpus.txt", corpus.clone().into_bytes())
        .await;
    let job = server.create_job(&body(&train, STEPS)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let row = format!("[data-testid=job-row][data-job-id='{id}']");
    browser
        .wait_until(
            "the job's row says running",
            &format!("return document.querySelector(\"{row} [data-testid=job-status]\")?.textContent === 'running'"),
            WAIT,
        )
        .await;
    browser.screenshot(&shots.join("jobs.png")).await;

    // The cluster names the job on the devices it holds.
    browser.goto(&proxy.url("/#/cluster")).await;
    browser
        .wait_for(
            &format!("[data-testid=device-row] a[href='#/jobs/{id}']"),
            WAIT,
        )
        .await;
    browser.screenshot(&shots.join("cluster.png")).await;
    browser.goto(&proxy.url("/#/jobs")).await;

    // Its page: the loss chart grows while it trains; the plan's timeline loads.
    // By keyboard: Tab to the job's link, Enter opens it.
    browser.wait_for(&format!("{row} a"), WAIT).await;
    let on_link = format!("return document.activeElement?.matches(\"{row} a\")");
    let mut tabs = 0;
    while browser.execute(&on_link, vec![]).await != true {
        tabs += 1;
        assert!(tabs <= 20, "the job's link is not reachable by Tab");
        browser.press("\u{E004}").await;
    }
    browser.press("\u{E007}").await;
    browser
        .wait_until("two loss points", "return Number(document.querySelector('[data-testid=loss-chart]')?.dataset.points) >= 2", WAIT)
        .await;
    let early = points(&browser).await;
    browser
        .wait_until(
            "the loss chart grows as the job trains",
            &format!("return Number(document.querySelector('[data-testid=loss-chart]').dataset.points) > {early}"),
            WAIT,
        )
        .await;
    browser
        .wait_until(
            "the plan timeline image",
            "const i = document.querySelector('[data-testid=plan-timeline]'); return i && i.complete && i.naturalWidth > 0",
            WAIT,
        )
        .await;

    // Device memory while it runs: one row per planned device, each measured peak within the
    // budget of the device it runs on.
    browser
        .wait_until(
            "device memory measured",
            "const rows = [...document.querySelectorAll('[data-testid=device-memory-row]')]; \
             return rows.length > 0 && rows.every(r => r.dataset.measured && r.dataset.budget)",
            WAIT,
        )
        .await;
    // Read in one script: the page redraws the rows as it polls, so rows found by one
    // WebDriver call may be gone by the next.
    let rows = browser
        .execute(
            "return [...document.querySelectorAll('[data-testid=device-memory-row]')] \
             .map(r => [r.dataset.measured, r.dataset.budget])",
            vec![],
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len() as u64, job["plan"]["devices"].as_u64().unwrap());
    for row in rows {
        let measured: u64 = row[0].as_str().unwrap().parse().unwrap();
        let budget: u64 = row[1].as_str().unwrap().parse().unwrap();
        assert!(
            measured > 0 && measured <= budget,
            "measured {measured}, budget {budget}"
        );
    }
    // Pause: the buttons follow the state; resume: it trains on to the end.
    let pause = browser
        .wait_for("[data-testid=pause-button]:not([disabled])", WAIT)
        .await;
    browser.click(&pause).await;
    status_is(&browser, "paused").await;
    // Held again near the end, so the connection is cut while the job still runs.
    pace.set(Duration::from_millis(100), STEPS - 5);
    let paused_at = points(&browser).await;
    assert!(
        paused_at > early && paused_at < STEPS as i64,
        "paused at {paused_at} of {STEPS}, first seen {early}"
    );
    assert!(
        !browser
            .enabled(&browser.wait_for("[data-testid=pause-button]", WAIT).await)
            .await
    );
    let resume = browser
        .wait_for("[data-testid=resume-button]:not([disabled])", WAIT)
        .await;
    browser.click(&resume).await;

    browser
        .wait_until(
            "the resume answered",
            "return document.querySelector('.job-head [data-testid=job-status]')?.textContent !== 'paused'",
            WAIT,
        )
        .await;

    // The connection drops for a moment: the stream resumes after the last event it had.
    proxy.cut();
    browser
        .wait_until(
            "the stream reconnected",
            "return Number(document.querySelector('[data-testid=events]').dataset.connections) >= 2",
            WAIT,
        )
        .await;
    pace.set(Duration::from_millis(100), u64::MAX);
    status_is(&browser, "succeeded").await;
    browser
        .wait_until(
            "the loss chart has every step",
            &format!("return Number(document.querySelector('[data-testid=loss-chart]').dataset.points) === {STEPS}"),
            WAIT,
        )
        .await;
    let finished = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(finished["restart_count"], 0, "{finished}");
    assert_eq!(
        browser
            .find_all("[data-testid=loss-chart] canvas")
            .await
            .len(),
        1
    );

    let kinds = browser
        .execute("return [...document.querySelectorAll('[data-testid=event-row]')].map(r => r.dataset.kind)", vec![])
        .await;
    let kinds: Vec<&str> = kinds
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for kind in ["state", "plan", "metrics", "checkpoint"] {
        assert!(kinds.contains(&kind), "no {kind} event row in {kinds:?}");
    }
    // Every event once, none missed across the reconnection.
    let ids = browser
        .execute("return [...document.querySelectorAll('[data-testid=event-row]')].map(r => Number(r.cells[0].textContent))", vec![])
        .await;
    let mut ids: Vec<i64> = ids
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    ids.sort();
    let all: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, all, "event ids shown");
    browser.screenshot(&shots.join("job.png")).await;

    // A checkpoint downloads with the key: the saved file is the API's bytes.
    let weights = format!(
        "[data-testid=checkpoint-link][data-step='{STEPS}'][data-name='model.safetensors']"
    );
    let link = browser.wait_for(&weights, WAIT).await;
    browser.click(&link).await;
    let saved = downloads
        .path()
        .join(format!("{id}-step-{STEPS}-model.safetensors"));
    let started = std::time::Instant::now();
    while !saved.exists() {
        assert!(
            started.elapsed() < WAIT,
            "no download at {}",
            saved.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = server
        .get(&format!(
            "/v1/jobs/{id}/checkpoints/{STEPS}/files/model.safetensors"
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read(&saved).unwrap(), expected.to_vec());

    new_job_form(&browser, &server, &proxy, &train, &shots).await;
    status_filter_and_pages(&browser, &server, &proxy, &train).await;
    cluster_and_phone(&browser, &proxy, &shots, &id).await;

    validation_on_the_loss_chart(&browser).await;
    another_tenant_sees_nothing(&browser, &proxy, &db.url).await;

    let log = browser.console_log().await;
    assert!(
        log.iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains(PROBE))),
        "{log:#?}"
    );
    let errors: Vec<&Value> = log.iter().filter(|e| unexpected(e)).collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.quit().await;
    server.stop().await;
    db.drop().await;
}

/// A console entry that is an error, other than the failed responses the scenario provokes
/// (the wrong key, the invalid and the misfit bodies: chromium logs any 4xx) and the requests
/// cut by the relay.
fn unexpected(entry: &Value) -> bool {
    let message = entry["message"].as_str().unwrap_or_default();
    let provoked = [
        "status of 401",
        "status of 422",
        "status of 400",
        "net::ERR_",
    ]
    .iter()
    .any(|s| message.contains(s));
    let probe = message.contains(PROBE);
    entry["level"] == "SEVERE" && !probe && !(entry["source"] == "network" && provoked)
}

async fn new_job_form(
    browser: &Browser,
    server: &TestServer,
    proxy: &CuttingProxy,
    train: &str,
    shots: &std::path::Path,
) {
    browser.goto(&proxy.url("/#/new")).await;
    browser.wait_for("[data-testid=new-job-form]", WAIT).await;

    // A field the API refuses is named at its line.
    let mut invalid = body(train, 4);
    invalid["training"]["seq_len"] = json!(0);
    set_editor(browser, &serde_json::to_string_pretty(&invalid).unwrap()).await;
    let message = browser
        .wait_for(
            "[data-testid=field-error][data-param='training.seq_len']",
            WAIT,
        )
        .await;
    assert!(
        browser.text(&message).await.starts_with("line "),
        "{}",
        browser.text(&message).await
    );

    // Uploading a file puts its id in the body; the preview shows the plan; create.
    set_editor(
        browser,
        &serde_json::to_string_pretty(&body("none yet", 4)).unwrap(),
    )
    .await;
    let corpus = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        corpus.path(),
        "A second corpus, uploaded from the form. ".repeat(20),
    )
    .unwrap();
    let upload = browser.wait_for("[data-testid=upload-input]", WAIT).await;
    browser
        .send_keys(&upload, corpus.path().to_str().unwrap())
        .await;
    browser
        .wait_until(
            "the preview fits",
            "return document.querySelector('[data-testid=plan-preview]').dataset.fits === 'true'",
            WAIT,
        )
        .await;
    let text = browser
        .execute(
            "return document.querySelector('[data-testid=job-editor]').value",
            vec![],
        )
        .await;
    let uploaded: Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
    let file_id = uploaded["data"]["train"].as_str().unwrap().to_owned();
    assert!(
        file_id.starts_with("file_") && file_id != train,
        "{uploaded}"
    );
    browser.screenshot(&shots.join("new-job.png")).await;
    browser
        .click(&browser.wait_for("[data-testid=create-button]", WAIT).await)
        .await;
    let hash = browser
        .wait_until(
            "the new job's page",
            "return location.hash.startsWith('#/jobs/job_') && location.hash",
            WAIT,
        )
        .await;
    let created = hash.as_str().unwrap().trim_start_matches("#/jobs/");
    let job = server.get_json(&format!("/v1/jobs/{created}")).await;
    assert_eq!(job["spec"]["data"]["train"], file_id.as_str());

    // A body no plan fits: the preview explains, and the created job says why at `devices`.
    browser.goto(&proxy.url("/#/new")).await;
    let mut misfit = body(train, 4);
    misfit["devices"] = json!("cpu:2x64KiB");
    set_editor(browser, &serde_json::to_string_pretty(&misfit).unwrap()).await;
    let why = browser
        .wait_for("[data-testid=plan-preview][data-fits=false]", WAIT)
        .await;
    assert!(
        browser.text(&why).await.contains("It would fit with"),
        "{}",
        browser.text(&why).await
    );
    browser
        .click(&browser.wait_for("[data-testid=create-button]", WAIT).await)
        .await;
    // The header redraws as the job refreshes, so read it in one go.
    let failure = browser
        .wait_until(
            "the failure at its field",
            "const e = document.querySelector('[data-testid=job-error]'); \
             const f = document.querySelector('[data-testid=error-field]'); \
             return e && f && [e.dataset.code, e.dataset.param, f.textContent]",
            WAIT,
        )
        .await;
    assert_eq!(failure[0], "plan_does_not_fit");
    assert_eq!(failure[1], "devices");
    assert!(
        failure[2].as_str().unwrap().contains("\"devices\""),
        "{failure}"
    );
    status_is(browser, "failed").await;
    browser.screenshot(&shots.join("does-not-fit.png")).await;
}

async fn cluster_and_phone(
    browser: &Browser,
    proxy: &CuttingProxy,
    shots: &std::path::Path,
    job: &str,
) {
    browser.goto(&proxy.url("/#/cluster")).await;
    browser.wait_for("[data-testid=device-row]", WAIT).await;
    assert_eq!(browser.find_all("[data-testid=device-row]").await.len(), 2);

    // Dark, as a browser set to prefer it shows the page.
    browser.prefer_dark(true).await;
    browser.goto(&proxy.url(&format!("/#/jobs/{job}"))).await;
    browser
        .wait_until(
            "the dark page's chart",
            "return Number(document.querySelector('[data-testid=loss-chart]')?.dataset.points) > 0",
            WAIT,
        )
        .await;
    let background = browser
        .execute(
            "return getComputedStyle(document.body).backgroundColor",
            vec![],
        )
        .await;
    assert_ne!(background, "rgb(247, 247, 248)", "the page stayed light");
    browser.screenshot(&shots.join("job-dark.png")).await;
    browser.prefer_dark(false).await;

    // At a phone's width no page scrolls sideways (wide tables scroll inside their box).
    browser.set_window(390, 844).await;
    for (page, ready, shot) in [
        ("/#/jobs", "[data-testid=job-row]", "jobs-phone.png"),
        (
            &format!("/#/jobs/{job}") as &str,
            "[data-testid=loss-chart] canvas",
            "job-phone.png",
        ),
        ("/#/new", "[data-testid=new-job-form]", "new-job-phone.png"),
    ] {
        browser.goto(&proxy.url(page)).await;
        browser.wait_for(ready, WAIT).await;
        let overflow = browser
            .execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth", vec![])
            .await;
        assert!(
            overflow.as_i64().unwrap() <= 0,
            "{page} is {overflow} px wider than a phone"
        );
        browser.screenshot(&shots.join(shot)).await;
    }
    browser.set_window(1280, 1000).await;
}

/// The metrics carry no validation loss until evaluation lands (issue 21, `val_loss` in the
/// rows of the steps that evaluated), so the chart's module is driven here with such rows.
async fn validation_on_the_loss_chart(browser: &Browser) {
    let drawn = browser
        .execute(
            "return (async () => {
               const { MetricSeries, chartsPanel } = await import('/dashboard/job_charts.js');
               const panel = chartsPanel();
               document.body.append(panel.element);
               const series = new MetricSeries();
               const row = (step, loss, val) => ({ step, loss, learning_rate: 1e-3, grad_norm: 1,
                 tokens_per_second: 100, ...(val === undefined ? {} : { val_loss: val }) });
               for (let step = 1; step <= 10; step++) series.add(row(step, 3 - step / 10, step % 5 ? undefined : 3.2 - step / 10));
               series.add(row(10, 2.05, 2.3)); // a resumed run reports step 10 again
               panel.update(series);
               await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
               const box = panel.element.querySelector('[data-testid=loss-chart]');
               const labels = [...box.querySelectorAll('.u-legend .u-label')].map((l) => l.textContent);
               const drawn = [Number(box.dataset.points), Number(box.dataset.valPoints), labels];
               panel.destroy();
               panel.element.remove();
               return drawn;
             })()",
            vec![],
        )
        .await;
    assert_eq!(drawn, json!([10, 2, ["step", "training", "validation"]]));
}

/// "Forget key", then another tenant's key: the jobs table is empty for it.
async fn another_tenant_sees_nothing(browser: &Browser, proxy: &CuttingProxy, database_url: &str) {
    let store = chronospipe::store::connect(database_url).await.unwrap();
    let other = chronospipe::api::create_key(store.as_ref(), "other")
        .await
        .unwrap();
    browser.goto(&proxy.url("/#/jobs")).await;
    browser.wait_for("[data-testid=job-row]", WAIT).await;
    browser
        .click(&browser.wait_for("#forget-key", WAIT).await)
        .await;
    let key = browser.wait_for("[data-testid=key-input]", WAIT).await;
    browser.type_text(&key, &format!("{other}\n")).await;
    let empty = browser
        .wait_until(
            "the other tenant's empty table",
            "return document.querySelector('[data-testid=status-filter]') && \
             document.querySelector('main .muted:not(:empty)')?.textContent",
            WAIT,
        )
        .await;
    assert_eq!(empty, "No jobs here yet.");
    assert!(browser.find_all("[data-testid=job-row]").await.is_empty());
}

/// The status filter shows only failed jobs; 21 of them take two pages of 20, newest first.
async fn status_filter_and_pages(
    browser: &Browser,
    server: &TestServer,
    proxy: &CuttingProxy,
    train: &str,
) {
    let mut misfit = body(train, 4);
    misfit["devices"] = json!("cpu:1x64KiB");
    let mut newest = String::new();
    for _ in 0..20 {
        newest = server.create_job(&misfit).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    browser.goto(&proxy.url("/#/jobs")).await;
    browser.wait_for("[data-testid=job-row]", WAIT).await;
    browser
        .execute(
            "const f = document.querySelector('[data-testid=status-filter]'); f.value = 'failed'; \
             f.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await;
    let rows = |count: usize| {
        format!(
            "const rows = [...document.querySelectorAll('[data-testid=job-row]')]; \
             return rows.length === {count} && \
               rows.every(r => r.querySelector('[data-testid=job-status]').textContent === 'failed') && \
               rows.map(r => r.dataset.jobId)"
        )
    };
    let first = browser
        .wait_until("a page of failed jobs", &rows(20), WAIT)
        .await;
    assert_eq!(first[0], newest.as_str(), "newest first");
    let older = browser
        .wait_for("[data-testid=older-page]:not([disabled])", WAIT)
        .await;
    browser.click(&older).await;
    let second = browser.wait_until("the second page", &rows(1), WAIT).await;
    assert!(
        !first.as_array().unwrap().contains(&second[0]),
        "{second} again"
    );
    browser
        .click(
            &browser
                .wait_for("[data-testid=newer-page]:not([disabled])", WAIT)
                .await,
        )
        .await;
    browser
        .wait_until("back to the first page", &rows(20), WAIT)
        .await;
}
