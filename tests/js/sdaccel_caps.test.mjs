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

test("a badge change is announced as the graph trigger Nodes 2.0 listens to", () => {
  const seen = [];
  const node = { id: 5, badges: [() => ({ text: "t" })], graph: { trigger: (action, param) => seen.push([action, param]) } };
  assert.equal(C.announceBadges(node), true);
  assert.equal(seen.length, 1);
  const [action, param] = seen[0];
  assert.equal(action, "node:property:changed");
  // 1.27 hands `param` to onTrigger as is, 1.35/1.49 spread it into {type, ...param}: both read these keys.
  assert.deepEqual({ ...param, newValue: undefined, oldValue: undefined },
    { type: "node:property:changed", nodeId: 5, property: "badges", newValue: undefined, oldValue: undefined });
  assert.equal(param.newValue, node.badges);
});

test("no graph, or a graph without trigger: nothing announced, nothing thrown", () => {
  assert.equal(C.announceBadges({ id: 1 }), false);
  assert.equal(C.announceBadges({ id: 1, graph: {} }), false);
  assert.equal(C.announceBadges(null), false);
});
