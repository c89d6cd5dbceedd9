// SD Accel ComfyUI extension: a status badge on our nodes (compiling / compiled / fell back,
// last run's it/s and DeepCache hit ratio), the fallback reasons under the node, and toasts
// when compilation starts, ends or falls back. The state logic lives in sdaccel_state.js,
// the probes of what this frontend offers in sdaccel_caps.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  EVENTS, PREFIX, StatusStore, badgeColors, badgeText, detailLines, detailToast, flattenGraph, isOurNodeType,
} from "./sdaccel_state.js";
import { badgeMode, reactiveCell, rootGraphOf, settingReader, toaster } from "./sdaccel_caps.js";

const TOAST_SETTING = "SDAccel.Toasts";
const store = new StatusStore();
const pathIds = new WeakMap(); // node object -> the id the server uses for it (subgraph paths)
const badges = new WeakMap(); // node object -> its one LGraphBadge (a click hit-tests the drawn instance)
const readSetting = settingReader(app);
const toast = toaster(app);
let ticker = null;
let changes = { n: 0 }; // made reactive in setup(), once the extension manager exists

function graphNodes() {
  const nodes = flattenGraph(rootGraphOf(app));
  for (const { id, node } of nodes) pathIds.set(node, id);
  return nodes;
}

function stateOf(node) {
  return store.get(pathIds.get(node) ?? String(node.id));
}

function redraw() {
  rootGraphOf(app)?.setDirtyCanvas?.(true, true);
  app.canvas?.setDirty?.(true, true);
  changes.n++; // Nodes 2.0 re-reads the badges
}

function toastsEnabled() {
  try {
    return readSetting(TOAST_SETTING) !== false;
  } catch {
    return true;
  }
}

function showToast(t) {
  if (t && toastsEnabled()) toast(t);
}

// While something compiles the badge shows the elapsed time: repaint once a second.
function keepTicking() {
  if (store.anyCompiling() && ticker === null) {
    ticker = setInterval(() => {
      redraw();
      if (!store.anyCompiling()) {
        clearInterval(ticker);
        ticker = null;
      }
    }, 1000);
  }
}

function onEvent(event, detail) {
  const { toast } = store.apply(event, detail, graphNodes());
  showToast(toast);
  keepTicking();
  redraw();
}

// One badge object per node, updated in place: the canvas hit-tests a click against the
// instance it drew. Reading `changes.n` makes Nodes 2.0 call this again after each change.
function badgeFor(node) {
  void changes.n;
  const state = stateOf(node);
  const { fg, bg } = badgeColors(state);
  let badge = badges.get(node);
  if (!badge) {
    badge = new window.LGraphBadge({ text: "" });
    badge.onClick = () => showDetails(node); // frontends with clickable badges (1.49's canvas and Nodes 2.0)
    badges.set(node, badge);
  }
  badge.text = badgeText(state);
  badge.fgColor = fg;
  badge.bgColor = bg;
  return badge;
}

function showDetails(node) {
  const t = detailToast(stateOf(node));
  if (t) toast(t); // asked for by a click: shown even with the notifications setting off
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let n = text.length;
  while (n > 1 && ctx.measureText(`${text.slice(0, n)}…`).width > width) n--;
  return `${text.slice(0, n)}…`;
}

// The reasons under the node, on a dark plate so links do not run through the text; the
// full text is in the toast and the console. Nodes 2.0 never calls onDrawForeground: there a
// click on the badge shows them.
function drawDetails(node, ctx) {
  const lines = detailLines(stateOf(node));
  if (!lines.length || node.flags?.collapsed) return;
  const width = Math.max(node.size[0], 260);
  const top = node.size[1] + 4;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "rgba(24, 24, 24, 0.9)";
  ctx.fillRect(0, top, width, lines.length * 14 + 6);
  ctx.fillStyle = "#f0b36a";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  lines.forEach((line, i) => ctx.fillText(fitText(ctx, line, width - 8), 4, top + 3 + i * 14));
  ctx.restore();
}

function drawFallbackBadge(node, ctx) {
  // Frontends without LGraphBadge: draw the same text under the title.
  const state = stateOf(node);
  const text = badgeText(state);
  if (!text) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = badgeColors(state).bg;
  ctx.textBaseline = "bottom";
  ctx.fillText(text, 4, -(globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30) - 4);
  ctx.restore();
}

app.registerExtension({
  name: "sdaccel.status",
  settings: [
    { id: TOAST_SETTING, name: "Show SD Accel compile notifications", type: "boolean", defaultValue: true, category: ["SD Accel", "Notifications", "Toasts"] },
  ],

  async setup() {
    changes = reactiveCell(app.extensionManager);
    for (const event of EVENTS) {
      api.addEventListener(PREFIX + event, (e) => onEvent(event, e.detail));
    }
  },

  beforeConfigureGraph() {
    store.clear(); // another workflow: node ids are reused, old states would mislead
  },

  nodeCreated(node) {
    if (!isOurNodeType(node.comfyClass ?? node.type)) return;
    if (badgeMode(node) === "badges") {
      node.badges.push(() => badgeFor(node));
    } else {
      const draw = node.onDrawForeground;
      node.onDrawForeground = function (ctx, ...rest) {
        draw?.call(this, ctx, ...rest);
        drawFallbackBadge(this, ctx);
      };
    }
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
      draw?.call(this, ctx, ...rest);
      drawDetails(this, ctx);
    };
  },
});
