"""Word lists for the generated datasets (fixed: the answer spaces depend on them)."""
from __future__ import annotations

# OCR words: difficulty 0 uses the first 20, 1 the first 100, 2 all of them.
WORDS = (
    'cat', 'dog', 'sun', 'tree', 'book', 'car', 'home', 'fish', 'bird', 'milk',
    'star', 'moon', 'door', 'lamp', 'ship', 'cake', 'rain', 'hat', 'key', 'cup',
    'apple', 'river', 'house', 'green', 'music', 'paper', 'water', 'light', 'bread', 'chair',
    'table', 'horse', 'plant', 'stone', 'cloud', 'train', 'phone', 'clock', 'mouse', 'snow',
    'road', 'bike', 'boat', 'coin', 'desk', 'farm', 'gold', 'hill', 'king', 'lake',
    'leaf', 'map', 'nest', 'park', 'ring', 'salt', 'sand', 'seed', 'shoe', 'sock',
    'tent', 'wall', 'wind', 'wolf', 'yard', 'zero', 'bell', 'bone', 'corn', 'drum',
    'egg', 'fire', 'frog', 'gate', 'hand', 'ice', 'jam', 'kite', 'lion', 'mask',
    'nose', 'owl', 'pen', 'queen', 'rope', 'sail', 'tiger', 'van', 'web', 'box',
    'yarn', 'zebra', 'anchor', 'basket', 'candle', 'garden', 'jacket', 'ladder', 'pencil', 'window',
    'airport', 'balloon', 'blanket', 'bottle', 'bridge', 'button', 'camera', 'carpet', 'castle', 'cookie',
    'dinner', 'dragon', 'engine', 'feather', 'forest', 'guitar', 'hammer', 'island', 'kettle', 'kitchen',
    'lemon', 'letter', 'market', 'mirror', 'monkey', 'needle', 'orange', 'palace', 'parrot', 'pepper',
    'pillow', 'pirate', 'planet', 'pocket', 'rabbit', 'rocket', 'saddle', 'school', 'shadow', 'silver',
    'spider', 'spring', 'square', 'summer', 'ticket', 'tomato', 'tunnel', 'turtle', 'valley', 'wallet',
    'winter', 'wizard', 'yellow', 'bicycle', 'cabinet', 'captain', 'chicken', 'crystal', 'diamond', 'dolphin',
    'elephant', 'festival', 'giraffe', 'harbor', 'helmet', 'journal', 'lantern', 'library', 'machine', 'meadow',
    'morning', 'mountain', 'notebook', 'ocean', 'painter', 'penguin', 'picture', 'pyramid', 'rainbow', 'sandwich',
    'science', 'sunset', 'teacher', 'thunder', 'tractor', 'umbrella', 'village', 'volcano', 'whistle', 'garage',
)
N_WORDS = (20, 100, len(WORDS))

# Names and cities for word problems, needles and plain text.
NAMES = ('Ada', 'Ben', 'Cleo', 'Dan', 'Eva', 'Finn', 'Gus', 'Hana', 'Ivan', 'Jade',
         'Kai', 'Lena', 'Milo', 'Nora', 'Omar', 'Pia', 'Ravi', 'Sara', 'Tom', 'Uma')
CITIES = ('Varno', 'Kelt', 'Ostra', 'Belun', 'Dorvik', 'Mireth', 'Tallon', 'Quessa', 'Ribon',
          'Sefra', 'Ulmar', 'Yorren', 'Pavlin', 'Edrin', 'Casko', 'Halden', 'Norvi', 'Grest',
          'Lumen', 'Astar')
ITEMS = ('apples', 'books', 'coins', 'pencils', 'stamps', 'marbles', 'cards', 'shells',
         'stickers', 'buttons')
BUTTONS = ('OK', 'Cancel', 'Save', 'Open', 'Help', 'Close', 'Next', 'Back', 'Send', 'Edit',
           'Delete', 'Search', 'Login', 'Submit', 'Undo', 'Print', 'Share', 'Copy', 'Paste', 'Exit')
WINDOW_TITLES = ('Settings', 'Editor', 'Mail', 'Files', 'Browser', 'Music', 'Photos', 'Notes')

# Filler-sentence parts for plain text and haystacks: subject, verb phrase, object.
SUBJECTS = ('The old bridge', 'A quiet river', 'The northern road', 'Every market', 'The small school',
            'A red tower', 'The harbor', 'The winter festival', 'A narrow street', 'The city council',
            'The library', 'A wooden boat', 'The eastern hill', 'The bakery', 'A stone wall',
            'The museum', 'The night train', 'A tall lighthouse', 'The village square', 'The garden')
VERBS = ('was built near', 'looks out over', 'is known for', 'was repaired after', 'stands beside',
         'was painted before', 'is busy during', 'leads toward', 'was moved to', 'is quiet after',
         'faces', 'is older than', 'opens before', 'closes after', 'was named after')
OBJECTS = ('the central park', 'the spring rains', 'the old mill', 'the first snow', 'the long valley',
           'the fish market', 'the stone church', 'the summer fair', 'the western gate',
           'the new station', 'the sea wall', 'the orchard', 'the clock tower', 'the main square',
           'the river mouth', 'the harvest', 'the pine forest', 'the town hall')
