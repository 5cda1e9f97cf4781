// Drives the dashboard in a real headless Chromium: sign in, see the overview (screenshot), find the dead
// job, replay it, and watch it complete. Usage: node dashboard.mjs <base-url> <admin-token> <dead-job-id> <screenshot-dir>
import { chromium } from "playwright-core";

const [base, token, jobId, shots] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
});
const fail = async (page, message) => {
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true });
  throw new Error(`${message} (screenshot: ${shots}/failure.png)`);
};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const consoleErrors = [];
  // Script errors fail the run; refused requests (the wrong token tried first) are expected.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // Confirmation dialogs (replay, purge) are accepted, and recorded.
  const dialogs = [];
  page.on("dialog", async (d) => { dialogs.push(d.message()); await d.accept(); });

  await page.goto(`${base}/dashboard`);
  await page.locator("#login").waitFor({ state: "visible" });
  await page.fill("#token", "not-the-token-at-all");
  await page.click("#login button[type=submit]");
  await page.locator("#login-error").filter({ hasText: /./ }).waitFor();
  await page.fill("#token", token);
  await page.click("#login button[type=submit]");

  // Overview: the dead job shows in its queue's row and in the totals.
  await page.locator("h1", { hasText: "Overview" }).waitFor();
  const deadCell = page.locator('tr[data-kind="backfill_page"] td[data-col="dead"]');
  await deadCell.filter({ hasText: "1" }).waitFor({ timeout: 10000 }).catch(() => fail(page, "the dead job is not counted"));
  await page.locator("table").filter({ hasText: "last heartbeat" }).locator("tbody tr").first().waitFor();
  // Charts of the sampled minutes: the minute with dead letters shows on the throughput chart's dead line.
  for (const chart of ["#chart-throughput", "#chart-depth"]) {
    await page.locator(`${chart} polyline`).first().waitFor().catch(() => fail(page, `${chart} is not drawn`));
  }
  const deadLine = await page.locator('#chart-throughput polyline[data-series="dead"]').getAttribute("points");
  const ys = deadLine.split(" ").map((p) => Number(p.split(",")[1]));
  if (new Set(ys).size < 2) await fail(page, `the dead letter does not show on the chart: ${deadLine}`);
  await page.locator('tr[data-schedule="connectors.purge_deleted"]').waitFor()
    .catch(() => fail(page, "the schedules are not shown"));
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  // Dead letters: the job is listed with its error; open it.
  await page.click('a[data-nav="dead"]');
  const row = page.locator(`tr[data-job="${jobId}"]`);
  await row.waitFor().catch(() => fail(page, `dead job ${jobId} is not listed`));
  const error = await row.locator("td.error-text").innerText();
  const object = await row.locator("td.object").innerText();
  if (!object.startsWith("s3:")) await fail(page, `the dead job's object is not shown: ${object}`);
  if (!/not found/i.test(error)) await fail(page, `the dead job's error is not shown: ${error}`);
  await page.locator("#bulk-replay").waitFor();
  await row.locator("a").first().click();
  await page.locator("h1", { hasText: `Job ${jobId}` }).waitFor();
  await page.locator('h1 [data-state="dead"]').waitFor();
  await page.screenshot({ path: `${shots}/dead-job.png`, fullPage: true });

  // Replay: confirmed, then the page updates by itself until the job has completed.
  await page.click("#retry");
  await page.locator('h1 [data-state="completed"]').waitFor({ timeout: 30000 })
    .catch(() => fail(page, "the replayed job did not complete"));
  if (!dialogs.some((m) => m.includes(`job ${jobId}`))) throw new Error(`no confirmation was asked: ${dialogs}`);
  await page.screenshot({ path: `${shots}/replayed-job.png`, fullPage: true });

  // Bulk cancel: the scheduled backlog of tenant "later" is counted first, confirmed, then cancelled.
  await page.goto(`${base}/dashboard#/jobs?state=scheduled&tenant_id=later`);
  await page.locator('tr[data-kind="ingest_object"]').first().waitFor()
    .catch(() => fail(page, "the scheduled backlog is not listed"));
  await page.click("#bulk-cancel");
  await page.locator("#status", { hasText: "Cancelled 3 job(s)" }).waitFor({ timeout: 10000 })
    .catch(() => fail(page, "the bulk cancel did not report its count"));
  if (!dialogs.some((m) => m.startsWith("Cancel 3 job(s)"))) throw new Error(`the count was not confirmed: ${dialogs}`);

  // A deep link opened without a token: the token prompt, then the linked job (not the overview).
  const fresh = await browser.newPage();
  fresh.on("pageerror", (e) => consoleErrors.push(String(e)));
  await fresh.goto(`${base}/dashboard#/job/${jobId}`);
  await fresh.locator("#login").waitFor({ state: "visible" });
  await fresh.fill("#token", token);
  await fresh.click("#login button[type=submit]");
  await fresh.locator("h1", { hasText: `Job ${jobId}` }).waitFor({ timeout: 10000 })
    .catch(() => fail(fresh, "the deep link did not survive the token prompt"));
  await fresh.close();
  // The link `serve` prints (token in the fragment) signs in at once, and the token leaves the address bar.
  const linked = await browser.newPage();
  await linked.goto(`${base}/dashboard#/job/${jobId}?token=${encodeURIComponent(token)}`);
  await linked.locator("h1", { hasText: `Job ${jobId}` }).waitFor({ timeout: 10000 })
    .catch(() => fail(linked, "the sign-in link did not open the job"));
  if (linked.url().includes("token=")) throw new Error(`the token stays in the address bar: ${linked.url()}`);
  await linked.close();

  // Connectors page renders (configs without secrets).
  await page.click('a[data-nav="connectors"]');
  await page.locator("h1", { hasText: "Connectors" }).waitFor();
  const connectors = await page.locator("main").innerText();
  if (connectors.includes("super-secret-key")) throw new Error("a secret is shown on the connectors page");
  if (!connectors.includes("<redacted>")) throw new Error("the connector's secrets are not shown as redacted");
  await page.screenshot({ path: `${shots}/connectors.png`, fullPage: true });
  if (consoleErrors.length) throw new Error(`console errors: ${consoleErrors.join("; ")}`);
  console.log("DASHBOARD OK");
} finally {
  await browser.close();
}
