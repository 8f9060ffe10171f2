// Interface strings, English and Chinese. The language follows the browser
// until the user picks one (kept in localStorage).
"use strict";

const STRINGS = {
  en: {
    knowledgeBases: "Knowledge bases", kbHelp: "Ticked knowledge bases answer this conversation: each question is answered from their documents, with numbered citations you can check, or \"I don't know\".",
    manageKbs: "Manage (admin)", kbName: "New knowledge base name", createKb: "Create", uploadFiles: "Upload files…", addFeed: "Add RSS/Atom feed",
    useHere: "Use here", documents: "Documents", feeds: "Feeds", searchOff: "Search: off", searchOn: "Search: {names}", noKbs: "No knowledge bases yet.",
    uploaded: "{file}: {added} added, {duplicates} duplicates", feedAdded: "Feed added; first poll within seconds.", sources: "Sources", feedFailing: "failing",
    imageOff: "Draw: off", imageOn: "Draw: on", imageHelp: "Draw pictures: your message becomes the prompt of the image model ({model}).", imagePlaceholder: "Describe the picture…", drawing: "Drawing… step {i} of {n}", download: "Download", anotherSeed: "Again, another seed", editPrompt: "Edit the English prompt", editPicture: "Edit this picture", redrawing: "Redrawing this picture", changeHowMuch: "How much to change", attachPicture: "Redraw a picture of yours", notAPicture: "That file is not a picture this browser can read.",
    toolsOff: "Tools: off", toolsOn: "Tools: on", toolsHelp: "Let the assistant run tools ({names}): exact arithmetic, dates, your knowledge bases and the MCP servers an admin added.", noTools: "This server offers no tools.",
    toolSteps: "Used tools: {n} steps", tool_calculator: "Calculator", tool_datetime: "Date and time", tool_search_knowledge: "Knowledge search", toolRunning: "running…", toolArgs: "Arguments", toolResult: "Result",
    mcpServers: "MCP servers", mcpHelp: "Their tools join the assistant's (as server__tool). Servers that run a program are set in the settings file only.", mcpName: "name", mcpPlans: "plans (all)", add: "Add", test: "Test", remove: "Remove", origin: "From", everyone: "everyone",
    tagline: "Your own private ChatGPT.",
    username: "User name", password: "Password", signIn: "Sign in", register: "Create account",
    setupToken: "Setup token (printed by hanlin serve)", setupHint: "This server has no administrator yet: the account created with the setup token becomes its administrator.",
    pendingApproval: "Account created. An administrator must approve it before you can sign in.", status: "Status", approve: "Approve", disable: "Disable", enable: "Enable", deleteUser: "Delete",
    signupPolicy: "Sign-up", signup_open: "open", signup_approval: "needs approval", signup_closed: "closed",
    status_active: "active", status_pending: "waiting for approval", status_disabled: "disabled",
    otherLanguage: "中文", toggleTheme: "Light / dark", signOut: "Sign out",
    newChat: "New chat", searchChats: "Search chats…", import: "Import ChatGPT export",
    apiKeys: "API keys", usage: "Usage", admin: "Admin", settings: "Settings",
    batches: "Batches", batchesHelp: "A JSONL file of requests (one {\"custom_id\", \"method\", \"url\", \"body\"} per line) runs in the background at the batch price; results stay for the server's keep time.",
    startBatch: "Upload and start", progress: "Progress", results: "Results", errors: "Errors", download: "Download",
    batchStarted: "Batch {id} started: {n} requests.", batchFailed: "The file was refused: {why}",
    batch_validating: "validating", batch_in_progress: "in progress", batch_finalizing: "finalizing", batch_completed: "completed",
    batch_failed: "failed", batch_expired: "expired", batch_cancelling: "cancelling", batch_cancelled: "cancelled",
    exportMd: "Export .md", exportJson: "Export .json",
    messagePlaceholder: "Message Hanlin… (Enter to send, Shift+Enter for a new line)",
    send: "Send", stop: "Stop", persona: "Persona", systemPrompt: "System prompt",
    voiceMode: "🎤 Voice", handsFree: "Hands-free", naturalVoice: "Natural voice (slower)", holdToTalk: "Hold to talk (Space)", voiceIdle: "Hold the button (or Space) and speak.",
    voiceListening: "Listening… just speak.", voiceHearing: "Hearing you…", voiceThinking: "Thinking…", voiceSpeaking: "Speaking… (talk to interrupt)",
    micUnavailable: "The microphone is not available ({why}). Browsers allow it only on HTTPS or on localhost.",
    personaVoice: "Voice", personaLook: "Avatar", defaultChoice: "(default)",
    look_scholar: "Scholar", look_friend: "Friend", look_teacher: "Teacher", look_robot: "Robot",
    saveAsPersona: "Save as persona", deletePersona: "Delete persona", noPersona: "(none)",
    temperature: "Temperature", maxTokens: "Max tokens", cancel: "Cancel", save: "Save",
    keysHelp: "Use a key with any OpenAI client: base URL {base}/v1. A new key is shown once.",
    keyName: "Key name", createKey: "Create key", close: "Close", revoke: "Revoke",
    revoked: "revoked", expires: "expires", created: "created", users: "Users", plans: "Plans",
    usageByUser: "Usage by user and model", importHelp: "Choose the conversations.json file from a ChatGPT data export.",
    imported: "Imported {n} conversations.", rename: "Rename", delete: "Delete",
    confirmDelete: "Delete this conversation?", copy: "Copy", copied: "Copied",
    edit: "Edit", regenerate: "Regenerate", saveAndSend: "Save & send",
    incomplete: "incomplete", errorReply: "The reply failed", emptyChat: "Ask anything — 中文 or English.",
    tooLong: "The message is too long: at most {n} characters.",
    sessionExpired: "Your session has expired. Please sign in again — your draft is kept.",
    connectionLost: "Connection lost. Reconnecting…", reconnected: "Reconnected.",
    plan: "Plan", tokensToday: "Tokens today", imagesToday: "Images today", imagesLeft: "{n} of {max} pictures left today", perDay: "per day", perMinute: "per minute",
    requests: "requests", day: "Day", model: "Model", prompt: "Prompt", cached: "Cached", completion: "Completion",
    role: "Role", name: "Name", priority: "Priority", price: "Price", noResults: "No matching chats.",
    renamePrompt: "New title:", personaName: "Persona name:", thinking: "…",
  },
  zh: {
    knowledgeBases: "知识库", kbHelp: "勾选的知识库回答本对话：每个问题都从其中的文档作答，附带可核对的编号引用；找不到依据时回答“不知道”。",
    manageKbs: "管理（管理员）", kbName: "新知识库名称", createKb: "创建", uploadFiles: "上传文件…", addFeed: "添加 RSS/Atom 订阅",
    useHere: "用于本对话", documents: "文档", feeds: "订阅", searchOff: "搜索：关", searchOn: "搜索：{names}", noKbs: "还没有知识库。",
    uploaded: "{file}：新增 {added}，重复 {duplicates}", feedAdded: "已添加订阅，几秒内首次抓取。", sources: "来源", feedFailing: "抓取失败",
    imageOff: "画图：关", imageOn: "画图：开", imageHelp: "画图：你的消息就是图像模型（{model}）的提示词。", imagePlaceholder: "描述你想要的画面……", drawing: "正在画……第 {i}/{n} 步", download: "下载", anotherSeed: "换个种子再画", editPrompt: "修改英文提示词", editPicture: "编辑这张图", redrawing: "重画这张图", changeHowMuch: "改动多少", attachPicture: "重画你的一张图片", notAPicture: "浏览器读不出这个文件里的图片。",
    toolsOff: "工具：关", toolsOn: "工具：开", toolsHelp: "让助手调用工具（{names}）：精确计算、日期、你的知识库，以及管理员添加的 MCP 服务。", noTools: "本服务器没有可用的工具。",
    toolSteps: "使用了工具：{n} 步", tool_calculator: "计算器", tool_datetime: "日期时间", tool_search_knowledge: "知识库检索", toolRunning: "运行中…", toolArgs: "参数", toolResult: "结果",
    mcpServers: "MCP 服务", mcpHelp: "其工具加入助手的工具（名为 服务__工具）。运行程序的服务只能在配置文件中设置。", mcpName: "名称", mcpPlans: "套餐（全部）", add: "添加", test: "测试", remove: "删除", origin: "来源", everyone: "所有人",
    tagline: "属于你自己的私有 ChatGPT。",
    username: "用户名", password: "密码", signIn: "登录", register: "注册",
    setupToken: "初始化令牌（hanlin serve 启动时打印）", setupHint: "本服务器还没有管理员：用初始化令牌注册的账号将成为管理员。",
    pendingApproval: "账号已创建，需管理员批准后才能登录。", status: "状态", approve: "批准", disable: "停用", enable: "启用", deleteUser: "删除",
    signupPolicy: "注册", signup_open: "开放", signup_approval: "需批准", signup_closed: "关闭",
    status_active: "正常", status_pending: "待批准", status_disabled: "已停用",
    otherLanguage: "English", toggleTheme: "浅色 / 深色", signOut: "退出",
    newChat: "新对话", searchChats: "搜索对话…", import: "导入 ChatGPT 导出",
    apiKeys: "API 密钥", usage: "用量", admin: "管理", settings: "设置",
    batches: "批量任务", batchesHelp: "上传请求的 JSONL 文件（每行一个 {\"custom_id\", \"method\", \"url\", \"body\"}），在后台按批量价格运行；结果按服务器设置的期限保留。",
    startBatch: "上传并开始", progress: "进度", results: "结果", errors: "错误", download: "下载",
    batchStarted: "批量任务 {id} 已开始：{n} 个请求。", batchFailed: "文件被拒绝：{why}",
    batch_validating: "校验中", batch_in_progress: "进行中", batch_finalizing: "收尾中", batch_completed: "已完成",
    batch_failed: "失败", batch_expired: "已过期", batch_cancelling: "取消中", batch_cancelled: "已取消",
    exportMd: "导出 .md", exportJson: "导出 .json",
    messagePlaceholder: "给翰林发消息…（回车发送，Shift+回车换行）",
    send: "发送", stop: "停止", persona: "角色", systemPrompt: "系统提示词",
    voiceMode: "🎤 语音", handsFree: "免按键", naturalVoice: "自然语音（较慢）", holdToTalk: "按住说话（空格）", voiceIdle: "按住按钮（或空格键）说话。",
    voiceListening: "正在听……请直接说话。", voiceHearing: "正在听你说……", voiceThinking: "思考中……", voiceSpeaking: "正在说……（开口即可打断）",
    micUnavailable: "无法使用麦克风（{why}）。浏览器只在 HTTPS 或 localhost 上允许使用麦克风。",
    personaVoice: "声音", personaLook: "形象", defaultChoice: "（默认）",
    look_scholar: "翰林学士", look_friend: "朋友", look_teacher: "老师", look_robot: "机器人",
    saveAsPersona: "存为角色", deletePersona: "删除角色", noPersona: "（无）",
    temperature: "温度", maxTokens: "最大生成长度", cancel: "取消", save: "保存",
    keysHelp: "任何 OpenAI 客户端都能用密钥：base URL 为 {base}/v1。新密钥只显示一次。",
    keyName: "密钥名称", createKey: "创建密钥", close: "关闭", revoke: "吊销",
    revoked: "已吊销", expires: "过期", created: "创建", users: "用户", plans: "套餐",
    usageByUser: "按用户和模型的用量", importHelp: "选择 ChatGPT 数据导出中的 conversations.json 文件。",
    imported: "已导入 {n} 个对话。", rename: "重命名", delete: "删除",
    confirmDelete: "删除这个对话？", copy: "复制", copied: "已复制",
    edit: "编辑", regenerate: "重新生成", saveAndSend: "保存并发送",
    incomplete: "未完成", errorReply: "回复失败", emptyChat: "问点什么吧——中文或英文都可以。",
    tooLong: "消息太长：最多 {n} 个字符。",
    sessionExpired: "登录已过期，请重新登录——草稿已保留。",
    connectionLost: "连接中断，正在重连…", reconnected: "已重新连接。",
    plan: "套餐", tokensToday: "今日 token", imagesToday: "今日图片", imagesLeft: "今天还能画 {n} 张（共 {max} 张）", perDay: "每天", perMinute: "每分钟",
    requests: "请求", day: "日期", model: "模型", prompt: "提示", cached: "缓存", completion: "生成",
    role: "角色", name: "名称", priority: "优先级", price: "计价", noResults: "没有匹配的对话。",
    renamePrompt: "新标题：", personaName: "角色名称：", thinking: "…",
  },
};

function pickLanguage() {
  const saved = localStorage.getItem("hanlin.lang");
  if (saved === "en" || saved === "zh") return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

let LANG = pickLanguage();

/** The string `key` in the current language, with `{name}` filled from `vars`. */
function t(key, vars) {
  let s = (STRINGS[LANG] && STRINGS[LANG][key]) || STRINGS.en[key] || key;
  for (const [k, v] of Object.entries(vars || {})) s = s.replaceAll("{" + k + "}", String(v));
  return s;
}

/** Fill every `data-i18n` element's text, `data-i18n-placeholder` placeholder and `data-i18n-title` title. */
function applyLanguage() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-title]")) { el.title = t(el.dataset.i18nTitle); el.setAttribute("aria-label", el.title); }
}

function setLanguage(lang) {
  LANG = lang;
  localStorage.setItem("hanlin.lang", lang);
  applyLanguage();
}
