// Opens the page, plays a wav file as the microphone (Chromium's fake capture), clicks "Speak" and waits
// until frames are drawn. Usage: node e2e.mjs URL WAV [min_frames]
import { chromium } from "playwright-core";

const [url, wav, minFrames = "12"] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         `--use-file-for-fake-audio-capture=${wav}`, "--autoplay-policy=no-user-gesture-required"],
});
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log("page:", m.text()));
  await page.goto(url);
  await page.waitForFunction(() => document.querySelectorAll("#identity option").length > 0);
  await page.click("#mic");
  await page.waitForFunction((n) => (window.avatarFramesDrawn || 0) >= n, Number(minFrames), { timeout: 60000 });
  // the canvas holds a drawn face, not the empty background
  const lit = await page.evaluate(() => {
    const c = document.getElementById("view");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
    return s / (d.length / 4);
  });
  const stats = await page.textContent("#stats");
  console.log(JSON.stringify({ frames: await page.evaluate(() => window.avatarFramesDrawn), lit, stats }));
  if (lit < 10) throw new Error("canvas is empty");
} finally {
  await browser.close();
}
