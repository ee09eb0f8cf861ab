"""Which Debian packages feed which corpus, and which are kept out of every corpus.

The general-domain corpus is built from the German (``de``) gettext catalogs of user-interface
software: office, finance, graphics, desktop environments, internet, multimedia, system and
developer tools. Games, educational software and astronomy/science software are **held out for
evaluation** and must not appear in any corpus: :data:`EXCLUDED_PACKAGES`,
:data:`EXCLUDED_NAME_PATTERNS` and :data:`EXCLUDED_SECTIONS` say what that means, and
:func:`exclusion_reason` is checked both on this list (by the tests) and on the real Debian
section of every downloaded package (by the builder).
"""

from __future__ import annotations

import re

#: English and German LibreOffice help: the target (kNN datastore) domain.
HELP_PACKAGES: dict[str, str] = {"en-US": "libreoffice-help-en-us", "de": "libreoffice-help-de"}

#: Packages whose ``de`` ``.mo`` catalogs make the general-domain corpus, by kind of software.
GENERAL_PACKAGES: dict[str, tuple[str, ...]] = {
    "office": (
        "libreoffice-l10n-de", "calligra-data", "calligraplan", "calligrasheets-data",
        "calligrawords-data", "calligrastage-data", "kexi-data", "karbon", "gnumeric-common",
        "glabels-data", "lyx-common", "zim", "xournalpp", "gnote", "planner-data", "evince-common",
        "okular", "atril-common", "kile-l10n",
    ),
    "finance": (
        "gnucash-common", "kmymoney-common", "skrooge-common", "homebank-data", "grisbi-common",
        "alkimia-data", "libaqbanking-data", "kraft",
    ),
    "graphics": (
        "inkscape", "gimp-data", "libgimp2.0", "gimp-plugin-registry", "digikam-data",
        "kipi-plugins-common", "krita-l10n", "darktable", "gwenview", "kolourpaint", "kphotoalbum",
        "shotwell-common", "gthumb-data", "eog", "hugin-data", "dia-common", "synfigstudio",
        "libsynfig0a", "mypaint-data", "rapid-photo-downloader", "kde-spectacle", "skanlite",
        "xsane-common", "font-manager-common", "libgegl-common", "geeqie-common", "drawing", "kamera",
        "kdenlive-data", "pitivi", "handbrake",
    ),
    "ebooks and documents": (
        "calibre", "foliate",
    ),
    "KDE desktop, PIM and frameworks": (
        "plasma-workspace-data", "plasma-desktop-data", "kdeplasma-addons-data", "kwin-data",
        "kinfocenter", "plasma-nm", "kdeconnect", "dolphin", "konqueror", "konsole", "kate5-data",
        "ktexteditor-data", "kdepim-runtime", "kdepim-addons", "kmail", "korganizer",
        "kf5-messagelib-data", "kalarm", "kontact", "kaddressbook-data", "akregator", "kget", "krdc",
        "krfb", "kleopatra", "systemsettings", "powerdevil-data", "kscreen", "khotkeys-data",
        "kmenuedit", "latte-dock", "plasma-framework", "libkf5kdelibs4support-data",
        "libkf5xmlgui-data", "libkf5textwidgets-data", "libkf5configwidgets-data",
        "libkf5newstuff-data", "libkf5wallet-data", "libkf5akonadi-data", "libkf5calendarsupport-data",
        "libkf5eventviews-data", "libkf5incidenceeditor-data", "libkf5mailcommon-data",
        "libkf5libkleo-data", "libkf5pimcommon-data", "libkf5ksieve-data", "kio", "kio-extras-data",
        "ark", "kgpg", "krusader", "ksystemlog", "partitionmanager", "k3b-i18n", "kcalc", "kcharselect",
        "kdf", "kfind", "kwalletmanager", "plasma-discover-common", "print-manager",
        "konversation-data", "ktorrent-data", "juk", "kmix", "elisa", "dragonplayer", "kaffeine",
        "kwave", "plasma-systemmonitor", "libkf5sysguard-data", "kde-cli-tools-data", "baloo-kf5",
        "kio-audiocd", "konq-plugins", "knotes", "kjots", "ktimetracker", "kdepim-themeeditors",
        "pim-sieve-editor", "akonadi-import-wizard", "accountwizard", "pim-data-exporter", "zanshin",
        "kdiff3", "yakuake", "kteatime", "krename", "kbackup", "filelight", "sweeper", "kmouth", "kmag",
    ),
    "GNOME / GTK desktop": (
        "gnome-control-center-data", "nautilus-data", "evolution-common",
        "evolution-data-server-common", "gnome-shell-common", "mutter-common", "gnome-terminal-data",
        "gedit-common", "file-roller", "seahorse", "gnome-system-monitor", "gnome-software-common",
        "libgtk-3-common", "libgtk-4-common", "libglib2.0-data", "gnome-disk-utility",
        "gnome-settings-daemon-common", "gnome-applets-data", "gnome-panel-data", "totem-common",
        "rhythmbox-data", "brasero-common", "cheese-common", "simple-scan", "baobab", "gnome-calendar",
        "gnome-maps", "gnome-contacts", "gnome-builder", "gucharmap", "yelp", "orca",
        "gnome-commander-data", "geary", "balsa-data", "epiphany-browser-data", "network-manager-gnome",
        "system-config-printer-common", "deja-dup", "gnome-boxes", "gnome-tweaks", "dconf-editor",
        "gparted-common",
    ),
    "MATE / Cinnamon / Xfce / LXDE": (
        "cinnamon-l10n", "mate-control-center-common", "mate-panel-common", "pluma-common",
        "caja-common", "mate-applets-common", "mate-utils-common", "mate-power-manager-common",
        "mate-system-monitor-common", "mate-terminal-common", "engrampa-common", "xfce4-settings",
        "xfce4-panel", "thunar-data", "xfdesktop4-data", "xfwm4", "xfce4-session",
        "xfce4-power-manager-data", "xfce4-terminal", "xfburn", "orage-data", "xfce4-weather-plugin",
        "mousepad", "parole", "ristretto", "lxpanel-data", "pcmanfm",
    ),
    "internet and communication": (
        "pidgin-data", "claws-mail-i18n", "sylpheed-i18n", "filezilla-common", "transmission-gtk",
        "hexchat-common", "gajim", "liferea-data", "network-manager", "remmina-common", "vinagre",
    ),
    "multimedia": (
        "vlc-l10n", "audacity-data", "easytag", "exfalso", "sound-juicer", "mkvtoolnix", "xine-ui",
    ),
    "system tools": (
        "synaptic", "aptitude-common", "systemd", "util-linux-locales", "apt", "dpkg", "coreutils",
        "findutils", "grep", "sed", "tar", "gawk", "diffutils", "mc-data", "nano", "vim-runtime",
        "neovim-runtime", "grub-common", "fwupd", "flatpak", "packagekit", "sudo", "procps",
        "e2fsprogs-l10n", "libc-l10n", "gnupg-l10n", "gpa", "xz-utils", "wget", "lftp", "man-db",
        "timeshift", "backintime-common", "bleachbit", "gufw", "firewalld",
    ),
    "developer tools": (
        "gcc-12-locales", "binutils-common", "bison", "flex", "make", "gettext", "git", "subversion",
        "mercurial-common", "kdevelop-l10n", "kdevelop-php-l10n", "kdevelop-python-l10n",
        "umbrello-data", "lokalize", "kompare", "kcachegrind", "cervisia", "kdesvn", "geany-common",
        "geany-plugins-common", "anjuta-common", "meld", "bluefish-data", "postgresql-15",
        "postgresql-client-15", "libgladeui-common", "devhelp-common", "gitg", "git-cola", "tortoisehg",
        "gnucobol3", "sphinx-common", "python3-django", "okteta", "libokteta-l10n",
        "poedit-common", "gtranslator", "regexxer", "xmlcopyeditor", "heaptrack-gui",
        "massif-visualizer", "sysprof", "libgda-5.0-common", "ghex", "wxhexeditor", "phpmyadmin",
        "kapptemplate", "m4", "texinfo", "help2man", "indent", "id-utils", "quilt", "dos2unix",
    ),
}

#: Debian sections that are held out wholesale: games, education, science and related fields.
EXCLUDED_SECTIONS: frozenset[str] = frozenset({"games", "education", "science", "electronics", "hamradio",
                                               "gnu-r"})

#: Section ``math`` mixes spreadsheets (office software) with mathematics/science programs; only
#: these office packages from it are allowed.
MATH_SECTION_ALLOWED: frozenset[str] = frozenset({"gnumeric-common", "calligrasheets-data", "kcalc"})

#: Explicitly excluded packages (games, education, astronomy, science, mathematics, medicine),
#: including ones filed under a neutral Debian section.
EXCLUDED_PACKAGES: frozenset[str] = frozenset(
    {
        # astronomy
        "kstars", "kstars-data", "stellarium", "stellarium-data", "celestia", "celestia-common",
        "marble", "marble-data", "marble-qt", "siril", "siril-common", "gpredict", "xplanet",
        # science, mathematics, medicine
        "step", "kalzium", "kalzium-data", "cantor", "labplot", "labplot-data", "kig", "kalgebra",
        "kalgebra-common", "kmplot", "rocs", "wxmaxima", "gretl", "pspp", "rkward", "rkward-data",
        "gnuplot", "octave", "qgis", "grass-core", "ghemical", "libghemical-data", "gelemental",
        "gperiodic", "bkchem", "chemtool", "avogadro", "python3-ase", "genius-common", "libgiac0",
        "libqalculate-data", "qalculate-gtk", "gnome-calculator", "mate-calc-common", "galculator",
        "gnumed-client", "invesalius", "aeskulap", "boinc-client", "boinc-manager", "oregano",
        "ktechlab", "linuxcnc-uspace", "gwyddion-common", "3depict", "viking", "navit-data",
        "gramps", "kxstitch-common",
        # education and learning
        "kgeography", "kgeography-data", "klettres", "klettres-data", "parley", "parley-data",
        "kwordquiz", "ktouch", "ktouch-data", "kturtle", "minuet", "minuet-data", "kbruch",
        "khangman", "kanagram", "artikulate", "blinken", "kiten", "gcompris-qt", "tuxpaint",
        "tuxpaint-data", "tuxpaint-config", "tuxmath", "solfege", "gtypist", "klavaro", "mnemosyne",
        "libkeduvocdocument-data", "auto-multiple-choice-common", "gwaei", "gjiten", "kanatest",
        "libticalcs2-13", "libtifiles2-11", "tilp2", "dasher-data", "sugar-session",
        "debian-edu-router-config", "debian-edu-router-fai",
        # games and game libraries
        "libkf5kdegames7", "libkf5kmahjongglib5", "libgnome-games-support-common", "teg",
        "gnome-video-arcade", "freeciv-data", "freedroidrpg-data", "unknown-horizons",
        "widelands-data", "wesnoth-1.16-data", "0ad-data", "supertuxkart-data", "gameconqueror",
    }
)

#: Name patterns for whole families of held-out packages (Sugar learning activities, game
#: engines and their data, KDE games, educational suites).
EXCLUDED_NAME_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^sugar-",
        r"^wesnoth",
        r"^freeciv",
        r"game",
        r"^k?mahjongg",
        r"^(?:kpat|kmines|ksudoku|kbreakout|kblocks|knights|kreversi|kshisen|kolf|palapeli|granatier)\b",
        r"^(?:gcompris|tuxpaint|tuxmath|tuxtype|childsplay|edu-)",
        r"astro|stellar|celestia|kstars",
    )
)


def exclusion_reason(name: str, section: str | None = None) -> str | None:
    """Why package ``name`` (in Debian ``section``, if known) is held out, or ``None`` if allowed."""
    if name in EXCLUDED_PACKAGES:
        return "excluded package"
    for pattern in EXCLUDED_NAME_PATTERNS:
        if pattern.search(name):
            return f"excluded name pattern {pattern.pattern!r}"
    if section is not None:
        base = section.rsplit("/", 1)[-1]
        if base in EXCLUDED_SECTIONS:
            return f"excluded section {base!r}"
        if base == "math" and name not in MATH_SECTION_ALLOWED:
            return "section 'math' (not an allowed office package)"
    return None


def general_package_names() -> list[str]:
    """All general-domain package names, in category order, without duplicates."""
    out: list[str] = []
    for names in GENERAL_PACKAGES.values():
        out.extend(n for n in names if n not in out)
    return out
