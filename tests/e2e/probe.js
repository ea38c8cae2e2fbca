// What the page shows, read from plotly.js's own graph divs (`gd.data`, `gd.layout`).
// Evaluated by tests/test_e2e_voila.py with Playwright's page.evaluate(); returns plain JSON.
// For every figure: its title and, per trace, its type, name, point count, the x / y labels
// (bars) and, for heatmaps, how many cells hold a block in use (z >= 2) plus a digest of z.
() => {
  const arr = (v) => (v == null ? [] : Array.from(v));
  const plots = Array.from(document.querySelectorAll(".js-plotly-plot"));
  return plots.map((gd) => {
    const layout = gd.layout || {};
    const title = layout.title && typeof layout.title === "object" ? layout.title.text : layout.title;
    const notes = arr(layout.annotations).map((a) => a.text || "");
    const traces = arr(gd.data).map((t) => {
      const out = { type: t.type || "scatter", name: t.name || "" };
      if (t.type === "heatmap") {
        const z = arr(t.z).map(Number);
        let digest = 0;
        z.forEach((v, i) => { digest = (digest * 31 + (v + 1) * (i + 7)) % 1000000007; });
        out.n = z.length;
        out.used = z.filter((v) => v >= 2).length;
        out.digest = digest;
      } else {
        const x = arr(t.x), y = arr(t.y);
        out.n = Math.max(x.length, y.length);
        out.x = x.slice(-400).map(String);
        out.y = y.slice(-400).map(String);
      }
      return out;
    });
    const box = gd.getBoundingClientRect();
    return { title: title || "", notes, traces, width: box.width, height: box.height };
  });
}
