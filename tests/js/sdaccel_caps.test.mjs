// Unit tests for web/sdaccel_caps.js: the probes pick the right path on fakes shaped like the
// objects frontends 1.27, 1.35 and 1.49 hand to an extension (read from their sources).
// Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

const load = async (name) => {
  const src = readFileSync(new URL(`../../web/${name}`, import.meta.url), "utf8");
  return import(`data:text/javascript;base64,${Buffer.from(src).toString("base64")}`);
};
const C = await load("sdaccel_caps.js");

test("the root graph: app.rootGraph where the frontend has it, else app.graph", () => {
  class App135 {
    get rootGraph() { return "root"; }
    get graph() { return "deprecated alias"; }
  }
  assert.equal(C.rootGraphOf(new App135()), "root");
  assert.equal(C.rootGraphOf({ graph: "g127" }), "g127");
  assert.equal(C.rootGraphOf(undefined), undefined);
});

test("settings come from the extension manager's store when it has one", () => {
  const app = { extensionManager: { setting: { get: (id) => (id === "SDAccel.Toasts" ? false : undefined) } },
    ui: { settings: { getSettingValue: () => true } } };
  assert.equal(C.settingReader(app)("SDAccel.Toasts"), false);
});

test("settings fall back to the legacy settings dialog, then to undefined", () => {
  assert.equal(C.settingReader({ ui: { settings: { getSettingValue: () => "legacy" } } })("x"), "legacy");
  assert.equal(C.settingReader({})("x"), undefined);
  assert.equal(C.settingReader(undefined)("x"), undefined);
});

test("the setting store is looked up per call (the manager is filled in after registration)", () => {
  const app = {};
  const read = C.settingReader(app);
  assert.equal(read("x"), undefined);
  app.extensionManager = { setting: { get: () => 3 } };
  assert.equal(read("x"), 3);
});

test("toasts go to the frontend's toast store, else to one console line", () => {
  const added = [];
  const lines = [];
  const con = { info: (l) => lines.push(["info", l]), warn: (l) => lines.push(["warn", l]) };
  const app = {};
  const toast = C.toaster(app, con);
  toast({ severity: "warn", summary: "S", detail: "D" });
  assert.deepEqual(lines, [["warn", "S: D"]]);
  app.extensionManager = { toast: { add: (t) => added.push(t) } };
  toast({ severity: "info", summary: "S2", detail: "D2" });
  assert.deepEqual(added.map((t) => t.summary), ["S2"]);
  assert.equal(lines.length, 1);
});

test("badges go into node.badges only where the frontend exports LGraphBadge", () => {
  class LGraphBadge {}
  assert.equal(C.badgeMode({ badges: [] }, { LGraphBadge }), "badges");
  assert.equal(C.badgeMode({ badges: [] }, {}), "draw", "no badge class: paint the text ourselves");
  assert.equal(C.badgeMode({}, { LGraphBadge }), "draw", "an old node without a badge list");
});

test("the change cell is what a reactive store hands back, and the store keeps no trace", () => {
  // A stand-in for Vue's deep reactivity: a store that wraps what is read back from it.
  const wrapped = new WeakMap();
  const raw = {};
  let wraps = 0;
  let last = null;
  const store = new Proxy(raw, {
    get(t, k) {
      const v = t[k];
      if (!v || typeof v !== "object") return v;
      if (!wrapped.has(v)) {
        last = new Proxy(v, {});
        wrapped.set(v, last);
        wraps++;
      }
      return wrapped.get(v);
    },
  });
  const cell = C.reactiveCell(store);
  assert.equal(wraps, 1, "the cell was read back through the store");
  assert.equal(cell, last, "what the store handed back is what the badges read");
  assert.deepEqual(Object.keys(raw), [], "and removed from it");
  assert.equal(cell.n, 0);
  cell.n++;
  assert.equal(cell.n, 1);
});

test("no store, or one that refuses writes: a plain cell, nothing thrown", () => {
  assert.deepEqual(C.reactiveCell(undefined), { n: 0 });
  assert.deepEqual(C.reactiveCell(Object.freeze({})), { n: 0 });
  const throwing = new Proxy({}, { set() { throw new Error("read-only store"); } });
  assert.deepEqual(C.reactiveCell(throwing), { n: 0 });
});
