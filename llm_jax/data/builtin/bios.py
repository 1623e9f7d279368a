"""The embedded default dataset: a fictional bilingual encyclopedia of invented people.

In the spirit of the bioS set of "Physics of Language Models, Part 3.1" (Allen-Zhu & Li): each
person has six attributes (birth date, birth city, university, major, employer, work city),
written out in several biographies per person and language, each drawing one of
`templates_per_attribute` sentence templates per attribute and a random sentence order. QA
chats ask about single attributes (single-turn) or several (multi-turn). People are split: QA
about the held-out people is never trained on, so evaluating on it measures whether a model
can extract knowledge it only read in biographies (pretrain on all bios, SFT on training QA).

Augmentation (`augment`, as in Physics of LM 3.1): "multiN" writes N biographies per person and
language, each with fresh template draws, in the canonical attribute order; "+permute" shuffles the
sentence order of each one; "single" is multi1 (bioS single). The paper found that extraction of
held-out people's facts after pretrain-then-finetune needs such variety. With augment "" the
biographies are the default ones above (`bios_per_entity` variants, shuffled order).

`unseen_fraction` leaves some people's biographies out of `bios` (and `bios_eval`) while their QA
stays where the held-out split puts it, so a knowledge eval can compare people seen in pretraining
with people never described there.

Everything is generated from `seed` with Python's `random.Random` (stable across platforms and
versions), in memory, with no downloads; the same config always yields the same records.
"""

from __future__ import annotations

import functools
import random
import re
import types

SURNAMES = [
    ("王", "Wang"), ("李", "Li"), ("张", "Zhang"), ("刘", "Liu"), ("陈", "Chen"), ("杨", "Yang"),
    ("黄", "Huang"), ("赵", "Zhao"), ("吴", "Wu"), ("周", "Zhou"), ("徐", "Xu"), ("孙", "Sun"),
    ("马", "Ma"), ("朱", "Zhu"), ("胡", "Hu"), ("郭", "Guo"), ("何", "He"), ("高", "Gao"),
    ("林", "Lin"), ("罗", "Luo"), ("郑", "Zheng"), ("梁", "Liang"), ("谢", "Xie"), ("宋", "Song"),
    ("唐", "Tang"), ("韩", "Han"), ("冯", "Feng"), ("邓", "Deng"), ("曹", "Cao"), ("彭", "Peng"),
    ("曾", "Zeng"), ("萧", "Xiao"), ("田", "Tian"), ("董", "Dong"), ("潘", "Pan"), ("袁", "Yuan"),
    ("蔡", "Cai"), ("蒋", "Jiang"), ("余", "Yu"), ("杜", "Du"), ("叶", "Ye"), ("程", "Cheng"),
    ("魏", "Wei"), ("苏", "Su"), ("吕", "Lyu"), ("丁", "Ding"), ("任", "Ren"), ("沈", "Shen"),
    ("姚", "Yao"), ("卢", "Lu"), ("崔", "Cui"), ("钟", "Zhong"), ("谭", "Tan"), ("范", "Fan"),
    ("金", "Jin"), ("石", "Shi"), ("廖", "Liao"), ("贾", "Jia"), ("夏", "Xia"), ("付", "Fu"),
    ("方", "Fang"), ("白", "Bai"), ("邹", "Zou"), ("孟", "Meng"), ("熊", "Xiong"), ("秦", "Qin"),
    ("邱", "Qiu"), ("尹", "Yin"), ("薛", "Xue"), ("闫", "Yan"), ("段", "Duan"), ("雷", "Lei"),
    ("侯", "Hou"), ("龙", "Long"), ("陶", "Tao"), ("顾", "Gu"), ("毛", "Mao"), ("郝", "Hao"),
]
GIVEN = [
    ("明", "ming"), ("华", "hua"), ("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("敏", "min"),
    ("静", "jing"), ("丽", "li"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"), ("洋", "yang"),
    ("勇", "yong"), ("艳", "yan"), ("杰", "jie"), ("娟", "juan"), ("涛", "tao"), ("超", "chao"),
    ("秀", "xiu"), ("霞", "xia"), ("平", "ping"), ("刚", "gang"), ("英", "ying"), ("文", "wen"),
    ("辉", "hui"), ("玲", "ling"), ("宇", "yu"), ("浩", "hao"), ("欣", "xin"), ("怡", "yi"),
    ("晨", "chen"), ("雪", "xue"), ("婷", "ting"), ("思", "si"), ("博", "bo"), ("嘉", "jia"),
    ("子", "zi"), ("涵", "han"), ("睿", "rui"), ("泽", "ze"), ("悦", "yue"), ("瑶", "yao"),
    ("琳", "lin"), ("凯", "kai"), ("鹏", "peng"), ("峰", "feng"), ("建", "jian"), ("国", "guo"),
    ("志", "zhi"), ("海", "hai"), ("云", "yun"), ("春", "chun"), ("晓", "xiao"), ("振", "zhen"),
    ("安", "an"), ("宁", "ning"), ("远", "yuan"), ("清", "qing"), ("松", "song"), ("岚", "lan"),
    ("蕾", "lei"), ("倩", "qian"), ("璐", "lu"), ("萌", "meng"), ("翔", "xiang"), ("航", "hang"),
    ("彬", "bin"), ("毅", "yi"), ("轩", "xuan"), ("蓉", "rong"),
]
CITIES = [
    ("北京", "Beijing"), ("上海", "Shanghai"), ("广州", "Guangzhou"), ("深圳", "Shenzhen"),
    ("杭州", "Hangzhou"), ("南京", "Nanjing"), ("成都", "Chengdu"), ("武汉", "Wuhan"),
    ("西安", "Xi'an"), ("重庆", "Chongqing"), ("天津", "Tianjin"), ("苏州", "Suzhou"),
    ("长沙", "Changsha"), ("青岛", "Qingdao"), ("大连", "Dalian"), ("厦门", "Xiamen"),
    ("昆明", "Kunming"), ("哈尔滨", "Harbin"), ("沈阳", "Shenyang"), ("郑州", "Zhengzhou"),
    ("济南", "Jinan"), ("福州", "Fuzhou"), ("合肥", "Hefei"), ("南昌", "Nanchang"),
    ("贵阳", "Guiyang"), ("兰州", "Lanzhou"), ("拉萨", "Lhasa"), ("台北", "Taipei"),
    ("香港", "Hong Kong"), ("宁波", "Ningbo"), ("无锡", "Wuxi"), ("桂林", "Guilin"),
    ("洛阳", "Luoyang"), ("扬州", "Yangzhou"), ("绍兴", "Shaoxing"), ("泉州", "Quanzhou"),
]
UNIVERSITIES = [  # invented
    ("东湖大学", "Donghu University"), ("青松大学", "Qingsong University"),
    ("星海理工大学", "Xinghai Institute of Technology"), ("云山大学", "Yunshan University"),
    ("明德学院", "Mingde College"), ("北辰大学", "Beichen University"),
    ("南岭大学", "Nanling University"), ("西岭师范大学", "Xiling Normal University"),
    ("长河大学", "Changhe University"), ("远山大学", "Yuanshan University"),
    ("白鹭大学", "Bailu University"), ("翠湖大学", "Cuihu University"),
    ("海棠医学院", "Haitang Medical College"), ("松涛大学", "Songtao University"),
    ("临江大学", "Linjiang University"), ("天穹大学", "Tianqiong University"),
    ("青岚大学", "Qinglan University"), ("锦城大学", "Jincheng University"),
]
FIELDS = [
    ("物理学", "physics"), ("化学", "chemistry"), ("生物学", "biology"), ("数学", "mathematics"),
    ("计算机科学", "computer science"), ("经济学", "economics"), ("历史学", "history"),
    ("哲学", "philosophy"), ("法学", "law"), ("医学", "medicine"), ("建筑学", "architecture"),
    ("天文学", "astronomy"), ("地质学", "geology"), ("心理学", "psychology"),
    ("社会学", "sociology"), ("语言学", "linguistics"), ("电子工程", "electrical engineering"),
    ("机械工程", "mechanical engineering"), ("音乐", "music"), ("新闻学", "journalism"),
]
EMPLOYERS = [  # invented
    ("星河科技", "Galaxy Technology"), ("青山制药", "Green Mountain Pharmaceuticals"),
    ("远洋航运", "Ocean Shipping Group"), ("北斗通信", "Polaris Communications"),
    ("晨光出版社", "Morning Light Press"), ("天工机械", "Tiangong Machinery"),
    ("云帆软件", "Cloudsail Software"), ("金石银行", "Goldstone Bank"),
    ("海鸥电子", "Seagull Electronics"), ("绿洲能源", "Oasis Energy"),
    ("明镜日报", "Clear Mirror Daily"), ("紫藤生物", "Wisteria Biotech"),
    ("飞鸿航空", "Swan Airlines"), ("松果咨询", "Pinecone Consulting"),
    ("蓝鲸数据", "Blue Whale Data"), ("赤霞食品", "Red Cloud Foods"),
    ("玄武材料", "Xuanwu Materials"), ("白石医院", "Whitestone Hospital"),
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")

BIO_TEMPLATES = {
    "en": {
        "birth_date": ["{name} was born on {v}.", "{name} came into the world on {v}.",
                       "The birth date of {name} is {v}.", "{name}'s birthday is {v}.",
                       "{name} was born on the day of {v}."],
        "birth_city": ["{name} was born in {v}.", "{name}'s hometown is {v}.",
                       "The birthplace of {name} is {v}.", "{name} comes from {v}.",
                       "{name} spent a childhood in {v}, the city of birth."],
        "university": ["{name} studied at {v}.", "{name} graduated from {v}.",
                       "{name} received an education at {v}.", "{name} is a graduate of {v}.",
                       "{name} completed a degree at {v}."],
        "major": ["{name} majored in {v}.", "{name} focused on {v} in college.",
                  "The field of study of {name} was {v}.", "{name} chose {v} as a major.",
                  "{name} earned a degree in {v}."],
        "employer": ["{name} works for {v}.", "{name} is employed by {v}.",
                     "The employer of {name} is {v}.", "{name} has a job at {v}.",
                     "{name} joined {v} after graduation."],
        "work_city": ["{name} works in {v}.", "{name} now lives and works in {v}.",
                      "The city where {name} works is {v}.", "{name} moved to {v} for work.",
                      "{name}'s workplace is located in {v}."],
    },
    "zh": {
        "birth_date": ["{name}出生于{v}。", "{name}于{v}出生。", "{name}的出生日期是{v}。",
                       "{name}的生日是{v}。", "{name}生于{v}。"],
        "birth_city": ["{name}出生在{v}。", "{name}的家乡是{v}。", "{name}的出生地是{v}。",
                       "{name}来自{v}。", "{name}在{v}度过了童年。"],
        "university": ["{name}毕业于{v}。", "{name}曾在{v}求学。", "{name}就读于{v}。",
                       "{name}是{v}的校友。", "{name}在{v}完成了学业。"],
        "major": ["{name}主修{v}。", "{name}的专业是{v}。", "{name}在大学学习{v}。",
                  "{name}选择了{v}作为专业。", "{name}获得了{v}学位。"],
        "employer": ["{name}就职于{v}。", "{name}受雇于{v}。", "{name}的雇主是{v}。",
                     "{name}在{v}上班。", "{name}毕业后加入了{v}。"],
        "work_city": ["{name}在{v}工作。", "{name}现在生活和工作在{v}。",
                      "{name}工作的城市是{v}。", "{name}为了工作搬到了{v}。",
                      "{name}的工作地点在{v}。"],
    },
}
QUESTIONS = {
    "en": {
        "birth_date": ["When was {name} born?", "What is the birth date of {name}?",
                       "On what date was {name} born?", "What is {name}'s birthday?"],
        "birth_city": ["Where was {name} born?", "What is the birthplace of {name}?",
                       "Which city is {name} from?", "In which city was {name} born?"],
        "university": ["Which university did {name} attend?", "Where did {name} study?",
                       "What university did {name} graduate from?",
                       "Which school is {name} a graduate of?"],
        "major": ["What did {name} major in?", "What was {name}'s field of study?",
                  "Which subject did {name} study?", "What is {name}'s major?"],
        "employer": ["Which company employs {name}?", "What company does {name} work for?",
                     "Who is {name}'s employer?", "Who does {name} work for?"],
        "work_city": ["In which city does {name} work?", "Where is {name}'s workplace?",
                      "Which city does {name} work in?", "What city is {name} employed in?"],
    },
    "zh": {
        "birth_date": ["{name}是哪天出生的？", "{name}的出生日期是什么？", "{name}的生日是哪一天？",
                       "{name}出生于何时？"],
        "birth_city": ["{name}出生在哪里？", "{name}的出生地是哪座城市？", "{name}来自哪个城市？",
                       "{name}的家乡是哪里？"],
        "university": ["{name}毕业于哪所大学？", "{name}在哪所学校求学？", "{name}是哪所大学的校友？",
                       "{name}就读于哪所大学？"],
        "major": ["{name}的专业是什么？", "{name}在大学学的是什么？", "{name}主修什么？",
                  "{name}学的是哪个专业？"],
        "employer": ["{name}在哪家公司工作？", "{name}的雇主是谁？", "{name}就职于哪家单位？",
                     "哪家公司雇用了{name}？"],
        "work_city": ["{name}在哪座城市工作？", "{name}的工作地点在哪里？", "{name}在哪个城市上班？",
                      "{name}工作的城市是哪里？"],
    },
}
SYSTEM_PROMPTS = {
    "en": "You are an assistant that answers questions about the people in the encyclopedia.",
    "zh": "你是一个熟悉百科全书中人物的助手，请回答关于他们的问题。",
}
_SEPARATOR = {"en": " ", "zh": ""}


def _make_people(n: int, rng: random.Random) -> list[dict]:
  """n people with unique Chinese and English names and random attributes."""
  max_names = len(SURNAMES) * len(GIVEN) ** 2
  if n > max_names // 4:
    raise ValueError(f"config.data.synthetic.n_entities={n} is too many; at most "
                     f"{max_names // 4} unique names can be drawn.")
  people, seen_zh, seen_en = [], set(), set()
  while len(people) < n:
    surname = rng.choice(SURNAMES)
    given = [rng.choice(GIVEN) for _ in range(rng.choice((1, 2, 2)))]
    zh = surname[0] + "".join(g[0] for g in given)
    en = "".join(g[1] for g in given).capitalize() + " " + surname[1]
    if zh in seen_zh or en in seen_en:  # homophones share an English name; skip both
      continue
    seen_zh.add(zh)
    seen_en.add(en)
    year, month, day = rng.randint(1900, 2005), rng.randint(1, 12), rng.randint(1, 28)
    person = {"name": {"zh": zh, "en": en},
              "birth_date": {"zh": f"{year}年{month}月{day}日",
                             "en": f"{MONTHS[month - 1]} {day}, {year}"}}
    for attribute, table in (("birth_city", CITIES), ("university", UNIVERSITIES),
                             ("major", FIELDS), ("employer", EMPLOYERS),
                             ("work_city", CITIES)):
      zh_value, en_value = rng.choice(table)
      person[attribute] = {"zh": zh_value, "en": en_value}
    people.append(person)
  return people


def _sentence(person: dict, attribute: str, lang: str, template: str) -> str:
  return template.format(name=person["name"][lang], v=person[attribute][lang])


def _biography(person: dict, lang: str, n_templates: int, rng: random.Random) -> str:
  order = list(ATTRIBUTES)
  rng.shuffle(order)
  return _SEPARATOR[lang].join(
      _sentence(person, a, lang, rng.choice(BIO_TEMPLATES[lang][a][:n_templates]))
      for a in order)


def _canonical_biography(person: dict, lang: str, n_templates: int, permute: bool,
                         rng: random.Random) -> str:
  """One augmented biography: fresh template draws, canonical order unless `permute`."""
  order = list(ATTRIBUTES)
  if permute:
    rng.shuffle(order)
  return _SEPARATOR[lang].join(
      _sentence(person, a, lang, rng.choice(BIO_TEMPLATES[lang][a][:n_templates]))
      for a in order)


def parse_augment(augment: str) -> tuple[int, bool] | None:
  """"" -> None (default biographies); "single" -> (1, False); "multi5+permute" -> (5, True)."""
  spec = augment.strip().lower()
  if not spec:
    return None
  parts = [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]
  n, permute = None, False
  for part in parts:
    m = re.fullmatch(r"multi(\d+)", part)
    if part == "single" and n is None:
      n = 1
    elif m and n is None and 1 <= int(m.group(1)) <= 100:
      n = int(m.group(1))
    elif part == "permute" and not permute:
      permute = True
    else:
      raise ValueError(f"config.data.synthetic.augment={augment!r}: cannot read {part!r}; write "
                       "single, multiN (1 <= N <= 100) or either with +permute, e.g. multi5+permute")
  if n is None:
    raise ValueError(f"config.data.synthetic.augment={augment!r}: name the number of biographies "
                     "per person (single or multiN), e.g. multi5+permute")
  return n, permute


def _qa_chats(person: dict, lang: str, cfg, rng: random.Random) -> list[dict]:
  n_templates = min(cfg.templates_per_attribute, len(QUESTIONS[lang]["major"]))

  def turn(attribute, question=None):
    question = question or rng.choice(QUESTIONS[lang][attribute][:n_templates])
    answer = BIO_TEMPLATES[lang][attribute][0]  # one canonical answer shape per attribute
    return [{"role": "user", "content": question.format(name=person["name"][lang])},
            {"role": "assistant", "content": _sentence(person, attribute, lang, answer)}]

  def chat(attributes, question=None):
    messages = [m for a in attributes for m in turn(a, question)]
    if rng.random() < cfg.system_prompt_prob:
      messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[lang]})
    return {"messages": messages}

  phrasings = min(cfg.qa_phrasings, n_templates)
  if phrasings == 1:  # one random phrasing per attribute (the draws of older versions)
    chats = [chat([a]) for a in ATTRIBUTES]
  else:  # the same fact asked `phrasings` ways: knowledge of the person, not of one string
    chats = [chat([a], q) for a in ATTRIBUTES
             for q in rng.sample(QUESTIONS[lang][a][:n_templates], phrasings)]
  for _ in range(cfg.multi_turn_per_entity):
    chats.append(chat(rng.sample(ATTRIBUTES, rng.randint(2, 3))))
  return chats


def parse_languages(cfg) -> list[str]:
  langs = [s.strip() for s in cfg.languages.split(",") if s.strip()]
  bad = [s for s in langs if s not in BIO_TEMPLATES]
  if bad or not langs:
    raise ValueError(f"config.data.synthetic.languages={cfg.languages!r}; use zh, en or 'zh,en'.")
  return langs


@functools.lru_cache(maxsize=4)
def _generate(n_entities, bios_per_entity, templates_per_attribute, heldout_fraction,
              multi_turn_per_entity, system_prompt_prob, languages, seed, augment="",
              unseen_fraction=0.0, qa_phrasings=1) -> dict:
  cfg = types.SimpleNamespace(templates_per_attribute=templates_per_attribute,
                              multi_turn_per_entity=multi_turn_per_entity,
                              system_prompt_prob=system_prompt_prob, languages=languages,
                              qa_phrasings=qa_phrasings)
  if not 1 <= templates_per_attribute <= 5:
    raise ValueError(f"config.data.synthetic.templates_per_attribute={templates_per_attribute}; "
                     "use 1..5 (the number of sentence templates written per attribute).")
  if not 1 <= qa_phrasings <= 4:
    raise ValueError(f"config.data.synthetic.qa_phrasings={qa_phrasings}; use 1..4 (question "
                     "phrasings asked per person and attribute).")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"config.data.synthetic.heldout_fraction={heldout_fraction}; use [0, 1).")
  if not 0.0 <= unseen_fraction < 1.0:
    raise ValueError(f"config.data.synthetic.unseen_fraction={unseen_fraction}; use [0, 1).")
  augmented = parse_augment(augment)
  langs = parse_languages(cfg)
  # Independent streams, so changing one size never reshuffles the others' draws.
  people = _make_people(n_entities, random.Random(f"{seed}-people"))
  order = list(range(n_entities))
  random.Random(f"{seed}-split").shuffle(order)
  heldout = set(order[:round(n_entities * heldout_fraction)])
  # Its own stream: unseen people are drawn across both QA groups, the QA split is unchanged.
  unseen_order = list(range(n_entities))
  random.Random(f"{seed}-unseen").shuffle(unseen_order)
  unseen = set(unseen_order[:round(n_entities * unseen_fraction)])
  bio_rng, eval_rng = random.Random(f"{seed}-bios"), random.Random(f"{seed}-bios-eval")
  aug_rng = random.Random(f"{seed}-bios-{augment}")
  qa_rng = random.Random(f"{seed}-qa")
  out = {"people": people, "heldout": sorted(heldout), "unseen": sorted(unseen), "bios": [],
         "bios_eval": [], "qa_train": [], "qa_heldout": []}
  for k, person in enumerate(people):
    for lang in langs:
      if k not in unseen:
        if augmented is None:
          for _ in range(bios_per_entity):
            out["bios"].append(
                {"text": _biography(person, lang, templates_per_attribute, bio_rng)})
        else:
          n_bios, permute = augmented
          out["bios"].extend(
              {"text": _canonical_biography(person, lang, templates_per_attribute, permute,
                                            aug_rng)} for _ in range(n_bios))
        out["bios_eval"].append(
            {"text": _biography(person, lang, templates_per_attribute, eval_rng)})
      chats = _qa_chats(person, lang, cfg, qa_rng)
      out["qa_heldout" if k in heldout else "qa_train"].extend(chats)
  return out


SPLITS = ("bios", "bios_eval", "qa_train", "qa_heldout")


def generate(synthetic_cfg) -> dict:
  """All splits of the encyclopedia for a config: {"people", "heldout", "unseen", "bios",
  "bios_eval", "qa_train", "qa_heldout"}; records are {"text"} or {"messages"} dicts; "heldout"
  and "unseen" are indices into "people". Cached per config."""
  c = synthetic_cfg
  return _generate(int(c.n_entities), int(c.bios_per_entity), int(c.templates_per_attribute),
                   float(c.heldout_fraction), int(c.multi_turn_per_entity),
                   float(c.system_prompt_prob), str(c.languages), int(c.seed),
                   str(c.get("augment", "")), float(c.get("unseen_fraction", 0.0)),
                   int(c.get("qa_phrasings", 1)))
