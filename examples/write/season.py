#!/usr/bin/env python3
"""Writes football.csv: one fictional season (eight made-up clubs, a double
round robin, 56 matches) of the 翰林联赛 / Hanlin League, the example data
for `hanlin write`. Every club, player and score is invented; the seed fixes
them, so the file is the same each time."""
import csv, datetime, random

CLUBS = [  # zh, en, stadium zh, stadium en, two players (zh, en)
    ("青川雄狮", "Qingchuan Lions", "青川体育场", "Qingchuan Stadium", [("王磊", "Wang Lei"), ("李航", "Li Hang")]),
    ("白沙海鸥", "Baisha Seagulls", "白沙湾球场", "Baisha Bay Arena", [("陈浩", "Chen Hao"), ("林帆", "Lin Fan")]),
    ("云岭猎豹", "Yunling Leopards", "云岭山地球场", "Yunling Highland Ground", [("赵鹏", "Zhao Peng"), ("杨帆", "Yang Fan")]),
    ("东湖骑士", "Donghu Knights", "东湖中心球场", "Donghu Central Stadium", [("孙凯", "Sun Kai"), ("周明", "Zhou Ming")]),
    ("北原苍狼", "Beiyuan Wolves", "北原体育中心", "Beiyuan Sports Centre", [("吴昊", "Wu Hao"), ("郑宇", "Zheng Yu")]),
    ("南溪飞鱼", "Nanxi Flyers", "南溪河畔球场", "Nanxi Riverside Ground", [("马骁", "Ma Xiao"), ("胡斌", "Hu Bin")]),
    ("石门巨人", "Shimen Giants", "石门堡球场", "Shimen Fortress Park", [("高远", "Gao Yuan"), ("罗杰", "Luo Jie")]),
    ("长河勇士", "Changhe Warriors", "长河体育场", "Changhe Stadium", [("许诺", "Xu Nuo"), ("梁晨", "Liang Chen")]),
]

def rounds(n):
    """Circle-method round robin: n-1 rounds, then the same with home and away swapped."""
    teams = list(range(n))
    first = []
    for r in range(n - 1):
        pairs = [(teams[i], teams[n - 1 - i]) for i in range(n // 2)]
        first.append([(a, b) if (r + i) % 2 == 0 else (b, a) for i, (a, b) in enumerate(pairs)])
        teams = [teams[0]] + [teams[-1]] + teams[1:-1]
    return first + [[(b, a) for a, b in rnd] for rnd in first]

def main():
    rng = random.Random(2026)
    start = datetime.date(2026, 3, 7)  # a Saturday
    rows = []
    for r, matches in enumerate(rounds(len(CLUBS)), 1):
        day = start + datetime.timedelta(weeks=r - 1)
        for k, (h, a) in enumerate(matches):
            date = day + datetime.timedelta(days=1 if k >= 2 else 0)
            hg, ag = rng.choice([0, 1, 1, 2, 2, 3, 4]), rng.choice([0, 0, 1, 1, 2, 3])
            if hg > ag or (hg == ag and rng.random() < 0.5):
                side, goals = h, hg
            else:
                side, goals = a, ag
            star_zh, star_en = rng.choice(CLUBS[side][4])
            star_goals = rng.randint(1, goals) if goals else 0
            rows.append({
                "id": f"r{r:02d}-{k + 1}",
                "round": r,
                "date": date.isoformat(),
                "home_zh": CLUBS[h][0], "home_en": CLUBS[h][1],
                "away_zh": CLUBS[a][0], "away_en": CLUBS[a][1],
                "home_goals": hg, "away_goals": ag,
                "venue_zh": CLUBS[h][2], "venue_en": CLUBS[h][3],
                "attendance": rng.randrange(6000, 42000),
                "star_zh": star_zh, "star_en": star_en,
                "star_team_zh": CLUBS[side][0], "star_team_en": CLUBS[side][1],
                "star_goals": star_goals,
            })
    with open("football.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} matches")

if __name__ == "__main__":
    main()
