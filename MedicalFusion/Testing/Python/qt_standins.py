"""Stand-ins for the parts of 3D Slicer that need the Qt application: ``qt``, ``ctk`` and the MRML widgets.

Used by :mod:`slicer_harness`, which runs Slicer's own, unmodified ``slicer`` Python package
(``ScriptedLoadableModule``, ``parameterNodeWrapper``, ``util``) on slicer-core's MRML classes. Only
what that package and MedicalFusion.py touch is here, written to behave as PythonQt exposes Qt:

- Qt properties are Python attributes (``button.enabled``, ``combo.currentIndex``); a widget is
  enabled only when its parents are (``QWidget::isEnabled``); dynamic properties (the .ui's
  ``stdset="0"``, e.g. ``SlicerParameterName``) go through ``property()`` / ``setProperty()``.
- Signals are per-instance objects with ``connect`` / ``disconnect`` / ``emit``;
  ``obj.connect("clicked(bool)", slot)`` works too, and, as in PythonQt, a slot that takes fewer
  arguments than the signal carries gets only the first ones.
- Setting a value from code emits the change signal only when the value changes (QComboBox,
  QCheckBox, QDoubleSpinBox...), ``clear()`` of a combo box emits index -1 and its first
  ``addItem`` selects item 0; a QDoubleSpinBox rounds to its ``decimals`` and clamps to its range.
  ``click()`` on a disabled button does nothing.
- ``qMRMLNodeComboBox`` filters the scene by ``nodeTypes`` / ``hideChildNodeTypes`` / hidden
  nodes and, without a "None" item and without action items, selects the first matching node when
  it gets the scene or when the first matching node is added, as the real one does; when the
  current node is removed it selects the node that followed it (else the last one), as the real
  one does outside a scene close (see ``qMRMLNodeComboBox.setMRMLScene`` for the Slicer and Qt
  source lines); while the scene closes, a removed current node is deselected.
- :func:`load_ui` builds the widget tree of a Qt Designer .ui file (widgets, layouts, properties,
  signal/slot connections) from these classes and refuses a class it does not know, where the real
  QUiLoader would silently fall back to a plain QWidget.

Nothing here is Slicer's or Qt's code; the behaviour follows their documentation and sources.
"""
from __future__ import annotations

import inspect
import math
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# signals


def call_slot(slot, args):
    """Call ``slot`` with as many of the signal's ``args`` as it accepts (PythonQt's rule)."""
    try:
        signature = inspect.signature(slot)
    except (TypeError, ValueError):
        return slot(*args)
    positional = 0
    for p in signature.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return slot(*args)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return slot(*args[:positional])


class Signal:
    """One signal of one object."""

    def __init__(self, name: str):
        self.name = name
        self._slots: list = []

    def connect(self, slot) -> bool:
        self._slots.append(slot)
        return True

    def disconnect(self, slot=None) -> bool:
        if slot is None:
            self._slots.clear()
            return True
        for i, s in enumerate(self._slots):
            if s == slot:
                del self._slots[i]
                return True
        return False

    def emit(self, *args) -> None:
        """Call every slot; as in PythonQt, an exception in a slot is reported (sys.excepthook, which
        prints it), not raised into the code that emitted the signal."""
        for slot in list(self._slots):
            try:
                call_slot(slot, args)
            except Exception:  # noqa: BLE001
                sys.excepthook(*sys.exc_info())

    __call__ = emit

    @property
    def receivers(self) -> int:
        return len(self._slots)


class QObject:
    SIGNALS: tuple = ("destroyed", "objectNameChanged")

    def __init__(self, parent=None):
        self._parent = None
        self._children: list = []
        self._dynamic: dict = {}
        self.objectName = ""
        for cls in type(self).__mro__:
            for name in cls.__dict__.get("SIGNALS", ()):
                if name not in self.__dict__:
                    self.__dict__[name] = Signal(name)
        if parent is not None:
            self.setParent(parent)

    # PythonQt exposes objectName as ``name`` too (slicer.util.childWidgetVariables uses it)
    @property
    def name(self) -> str:
        return self.objectName

    @name.setter
    def name(self, value: str) -> None:
        self.objectName = value

    def setObjectName(self, value: str) -> None:
        self.objectName = value

    def className(self) -> str:
        return type(self).__name__

    def parent(self):
        return self._parent

    def setParent(self, parent) -> None:
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, cls=None) -> list:
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found.extend(child.findChildren(cls))
        return found

    def property(self, name: str):
        return self._dynamic.get(name)

    def setProperty(self, name: str, value) -> bool:
        self._dynamic[name] = value
        return False   # Qt returns False for a dynamic property

    def connect(self, signature: str, slot) -> bool:
        return getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature: str, slot=None) -> bool:
        return getattr(self, signature.split("(")[0]).disconnect(slot)

    def deleteLater(self) -> None:
        pass

    def isWidgetType(self) -> bool:
        return False

    def blockSignals(self, block: bool) -> bool:
        return False


# --------------------------------------------------------------------------------------------------
# widgets and layouts


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._enabled = True
        self._hidden = False
        self.toolTip = ""
        self.statusTip = ""
        self.styleSheet = ""
        self._layout = None

    def isWidgetType(self) -> bool:
        return True

    @property
    def enabled(self) -> bool:
        parent = self.parentWidget()
        return self._enabled and (parent is None or parent.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    def setEnabled(self, value: bool) -> None:
        self.enabled = value

    def isEnabled(self) -> bool:
        return self.enabled

    @property
    def visible(self) -> bool:
        return not self._hidden

    @visible.setter
    def visible(self, value: bool) -> None:
        self._hidden = not value

    def setVisible(self, value: bool) -> None:
        self.visible = value

    def isVisible(self) -> bool:
        return self.visible

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def parentWidget(self):
        p = self._parent
        while p is not None and not p.isWidgetType():
            p = p._parent
        return p

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout
        layout.setParent(self)

    def repaint(self) -> None:
        pass


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__(None)
        self._items: list = []
        if parent is not None:
            parent.setLayout(self)

    def _owner(self):
        p = self._parent
        while p is not None and not p.isWidgetType():
            p = p._parent
        return p

    def addWidget(self, widget, *args) -> None:
        widget.setParent(self._owner())
        self._items.append(widget)

    def addLayout(self, layout, *args) -> None:
        layout.setParent(self)
        self._items.append(layout)

    def addRow(self, *args) -> None:
        for item in args:
            if isinstance(item, QWidget):
                self.addWidget(item)
            elif isinstance(item, QLayout):
                self.addLayout(item)

    def addStretch(self, *args) -> None:
        pass

    def addItem(self, item) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):
        return self._items[index] if 0 <= index < len(self._items) else None

    def removeItem(self, item) -> None:
        if item in self._items:
            self._items.remove(item)

    def removeWidget(self, widget) -> None:
        self.removeItem(widget)

    def setContentsMargins(self, *args) -> None:
        pass


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        if isinstance(text, QObject):
            text, parent = "", text
        super().__init__(parent)
        self.text = text
        self.wordWrap = False

    def setText(self, text: str) -> None:
        self.text = text


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled", "pressed", "released")

    def __init__(self, text="", parent=None):
        if isinstance(text, QObject):
            text, parent = "", text
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    def setText(self, text: str) -> None:
        self.text = text

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value) and self.checkable
        if value != self._checked:
            self._checked = value
            self._checked_changed()

    def _checked_changed(self) -> None:
        self.toggled.emit(self._checked)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self.checked

    def click(self) -> None:
        """What a mouse click does: nothing when disabled; toggles a checkable button; clicked(checked)."""
        if not self.enabled:
            return
        self.pressed.emit()
        self.released.emit()
        if self.checkable:
            self.checked = not self._checked
        self.clicked.emit(self._checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged",)

    def __init__(self, text="", parent=None):
        super().__init__(text, parent)
        self.checkable = True

    def _checked_changed(self) -> None:
        self.stateChanged.emit(2 if self._checked else 0)
        self.toggled.emit(self._checked)


class QStandardItem:
    def __init__(self, text: str = ""):
        self._text = text
        self._enabled = True
        self._data: dict = {}

    def text(self) -> str:
        return self._text

    def setEnabled(self, value: bool) -> None:
        self._enabled = bool(value)

    def isEnabled(self) -> bool:
        return self._enabled

    def setData(self, value, role) -> None:
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)


class QStandardItemModel(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list = []

    def item(self, row: int, column: int = 0):
        return self._items[row] if 0 <= row < len(self._items) else None

    def rowCount(self) -> int:
        return len(self._items)


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged", "currentTextChanged", "activated")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._model = QStandardItemModel(self)
        self._current = -1

    def model(self):
        return self._model

    @property
    def count(self) -> int:
        return len(self._model._items)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        index = int(index)
        if not -1 <= index < self.count:
            index = -1
        if index != self._current:
            self._current = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    @property
    def currentText(self) -> str:
        return self._model._items[self._current].text() if self._current >= 0 else ""

    def addItem(self, text, userData=None) -> None:
        item = QStandardItem(str(text))
        if userData is not None:
            item.setData(userData, Qt.UserRole)
        self._model._items.append(item)
        if self._current == -1 and self.count == 1:
            self.currentIndex = 0

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def clear(self) -> None:
        had = self._current != -1
        self._model._items.clear()
        self._current = -1
        if had:
            self.currentIndexChanged.emit(-1)
            self.currentTextChanged.emit("")

    def itemText(self, index: int) -> str:
        return self._model._items[index].text()

    def findText(self, text: str) -> int:
        for i, item in enumerate(self._model._items):
            if item.text() == text:
                return i
        return -1

    def setItemData(self, index: int, value, role=None) -> None:
        self._model._items[index].setData(value, Qt.UserRole if role is None else role)

    def itemData(self, index: int, role=None):
        return self._model._items[index].data(Qt.UserRole if role is None else role)


class QAbstractSpinBox(QWidget):
    SIGNALS = ("valueChanged", "editingFinished")


class QDoubleSpinBox(QAbstractSpinBox):
    """Qt's defaults: range 0..99.99, 2 decimals; values are rounded to ``decimals`` and clamped."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._minimum, self._maximum, self._decimals = 0.0, 99.99, 2
        self._value = 0.0
        self.singleStep = 1.0
        self.suffix = ""
        self.prefix = ""

    def _round(self, v: float) -> float:
        if math.isinf(v) or math.isnan(v):
            return v
        return round(float(v), self._decimals)

    def _set(self, v: float) -> None:
        v = min(max(self._round(v), self._minimum), self._maximum)
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, v: float) -> None:
        self._set(v)

    def setValue(self, v: float) -> None:
        self._set(v)

    @property
    def decimals(self) -> int:
        return self._decimals

    @decimals.setter
    def decimals(self, d: int) -> None:
        self._decimals = int(d)
        self._set(self._value)

    @property
    def minimum(self) -> float:
        return self._minimum

    @minimum.setter
    def minimum(self, v: float) -> None:
        self._minimum = float(v)
        self._maximum = max(self._maximum, self._minimum)
        self._set(self._value)

    @property
    def maximum(self) -> float:
        return self._maximum

    @maximum.setter
    def maximum(self, v: float) -> None:
        self._maximum = float(v)
        self._minimum = min(self._minimum, self._maximum)
        self._set(self._value)

    def setMinimum(self, v) -> None:
        self.minimum = v

    def setMaximum(self, v) -> None:
        self.maximum = v

    def setRange(self, lo, hi) -> None:
        self.minimum, self.maximum = lo, hi


class QSpinBox(QDoubleSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._decimals = 0
        self._maximum = 99.0

    def _round(self, v: float) -> int:
        return int(round(float(v)))


class QSlider(QSpinBox):
    pass


class QLineEdit(QWidget):
    SIGNALS = ("textChanged", "editingFinished")

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self._text = text

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self.textChanged.emit(value)


class QTextEdit(QWidget):
    SIGNALS = ("textChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self.readOnly = False

    def toPlainText(self) -> str:
        return self._text

    def setPlainText(self, text: str) -> None:
        if text != self._text:
            self._text = text
            self.textChanged.emit()

    def insertPlainText(self, text: str) -> None:
        self.setPlainText(self._text + text)

    def insertHtml(self, text: str) -> None:
        self.setPlainText(self._text + text)


class QProgressBar(QWidget):
    SIGNALS = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum = 0, 100
        self._value = -1
        self.format = "%p%"
        self.textVisible = True

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, v: int) -> None:
        v = int(v)
        if self.minimum <= v <= self.maximum and v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setValue(self, v: int) -> None:
        self.value = v

    def setMaximum(self, v: int) -> None:
        self.maximum = int(v)

    def setRange(self, lo: int, hi: int) -> None:
        self.minimum, self.maximum = int(lo), int(hi)


class QFrame(QWidget):
    pass


class QGroupBox(QWidget):
    def __init__(self, title="", parent=None):
        if isinstance(title, QObject):
            title, parent = "", title
        super().__init__(parent)
        self.title = title


class QDialog(QWidget):
    SIGNALS = ("accepted", "rejected", "finished")

    def exec_(self) -> int:
        return 0

    exec = exec_

    def close(self) -> bool:
        self.visible = False
        return True


class QMessageBox(QDialog):
    """A message box: ``exec_()`` records what was shown and answers ``QMessageBox.answer``."""

    Ok, Cancel, Yes, No, Retry, Close = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4
    answer = Cancel
    shown: list = []

    def __init__(self, *args, **kwargs):
        parent = next((a for a in args if isinstance(a, QObject)), None)
        super().__init__(parent)
        self.text = ""
        self.windowTitle = ""
        self.detailedText = ""
        self.icon = 0
        self.standardButtons = 0

    def exec_(self) -> int:
        QMessageBox.shown.append({"title": self.windowTitle, "text": self.text, "icon": self.icon})
        return QMessageBox.answer

    exec = exec_


class QMainWindow(QWidget):
    pass


# --------------------------------------------------------------------------------------------------
# non-widget Qt classes MedicalFusion.py and Slicer's Python package use


class Qt:
    DisplayRole, ToolTipRole, UserRole = 0, 3, 0x0100
    WaitCursor, ArrowCursor, BusyCursor = 3, 0, 16
    Horizontal, Vertical = 1, 2
    TextSelectableByMouse = 1
    ShiftModifier, NoModifier = 0x02000000, 0
    ToolButtonTextUnderIcon = 3
    AlignLeft, AlignRight, AlignCenter = 1, 2, 0x84


class QSettings:
    """Application settings: one store for the whole harness (``QSettings.store``)."""

    store: dict = {}

    def __init__(self, *args):
        pass

    def value(self, key, default=None):
        return QSettings.store.get(key, default)

    def setValue(self, key, value) -> None:
        QSettings.store[key] = value

    def contains(self, key) -> bool:
        return key in QSettings.store

    def remove(self, key) -> None:
        QSettings.store.pop(key, None)


class QIcon:
    def __init__(self, path: str = ""):
        self.path = str(path)

    def isNull(self) -> bool:
        return not self.path


class QFile:
    ReadOnly, WriteOnly = 1, 2

    def __init__(self, path):
        self._path = str(path)

    def exists(self) -> bool:
        return Path(self._path).is_file()

    def open(self, mode) -> bool:
        return self.exists() or mode != QFile.ReadOnly

    def close(self) -> None:
        pass

    def fileName(self) -> str:
        return self._path

    def remove(self) -> bool:
        try:
            Path(self._path).unlink()
            return True
        except OSError:
            return False


class QDir:
    def mkpath(self, path) -> bool:
        Path(path).mkdir(parents=True, exist_ok=True)
        return True


class QColor:
    """Enough of QColor for Slicer's QColorSerializer to be defined (main branch)."""

    def __init__(self, *args):
        self._name = str(args[0]) if args and isinstance(args[0], str) else "#000000"

    def name(self, fmt: int = 0) -> str:
        return self._name

    def isValid(self) -> bool:
        return True


class QTimer(QObject):
    SIGNALS = ("timeout",)
    pending: list = []

    @staticmethod
    def singleShot(msec, callback) -> None:
        QTimer.pending.append(callback)


class QCursor:
    def __init__(self, shape=0):
        self._shape = shape.shape() if isinstance(shape, QCursor) else shape

    def shape(self):
        return self._shape


class QApplication:
    overrides: list = []

    @staticmethod
    def setOverrideCursor(cursor) -> None:
        QApplication.overrides.append(cursor if isinstance(cursor, QCursor) else QCursor(cursor))

    @staticmethod
    def restoreOverrideCursor() -> None:
        if QApplication.overrides:
            QApplication.overrides.pop()

    @staticmethod
    def overrideCursor():
        return QApplication.overrides[-1] if QApplication.overrides else None


class QThread(QObject):
    _main = None

    @staticmethod
    def currentThread():
        if QThread._main is None:
            QThread._main = QThread()
        return QThread._main

    @staticmethod
    def msleep(msec) -> None:
        pass


class QEventLoop:
    AllEvents, ExcludeUserInputEvents = 0, 1


class QSize:
    def __init__(self, w=0, h=0):
        self._w, self._h = w, h

    def width(self):
        return self._w

    def height(self):
        return self._h


class QSizePolicy:
    Fixed, Minimum, Maximum, Preferred, Expanding, MinimumExpanding, Ignored = 0, 1, 4, 5, 7, 3, 13

    def __init__(self, *args):
        pass


class QUiLoader:
    """``loader.load(qfile)``: the widget tree of a .ui file (see :func:`load_ui`)."""

    resolver = None   # set by the harness: class name -> class

    def load(self, qfile, parent=None):
        return load_ui(qfile.fileName(), QUiLoader.resolver, parent)


# --------------------------------------------------------------------------------------------------
# CTK


class ctkCollapsibleButton(QAbstractButton):
    SIGNALS = ("contentsCollapsed",)

    def __init__(self, text="", parent=None):
        super().__init__(text, parent)
        self.collapsed = False


class ctkCollapsibleGroupBox(QGroupBox):
    pass


class ctkCheckBox(QCheckBox):
    pass


class ctkComboBox(QComboBox):
    pass


class ctkDoubleSpinBox(QDoubleSpinBox):
    pass


class ctkSliderWidget(QDoubleSpinBox):
    pass


class ctkDoubleSlider(QDoubleSpinBox):
    pass


class ctkRangeWidget(QWidget):
    SIGNALS = ("valuesChanged",)


class ctkDoubleRangeSlider(ctkRangeWidget):
    pass


class ctkPathLineEdit(QWidget):
    """A path field: ``currentPath`` (set from code or typed) emits currentPathChanged(path) on change."""

    SIGNALS = ("currentPathChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self.filters = ""
        self.settingKey = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, value: str) -> None:
        if value != self._path:
            self._path = value
            self.currentPathChanged.emit(value)

    def setCurrentPath(self, value: str) -> None:
        self.currentPath = value


class ctkDirectoryButton(QWidget):
    SIGNALS = ("directoryChanged",)


class ctkCheckablePushButton(QPushButton):
    pass


class ctkColorPickerButton(QPushButton):
    SIGNALS = ("colorChanged",)


class ctkMessageBox(QMessageBox):
    pass


class ctkFlowLayout(QLayout):
    pass


# --------------------------------------------------------------------------------------------------
# MRML widgets (slicer.qMRML*)


class qSlicerWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        if scene is not self._scene:
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLWidget(qSlicerWidget):
    pass


class qMRMLNodeComboBox(QWidget):
    """Node selector: see the module docstring for what it emulates."""

    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged", "nodeAdded", "nodeAboutToBeRemoved",
               "nodeActivated", "nodeAddedByUser")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._current = None
        self._observers: list = []
        self.nodeTypes = ()
        self.hideChildNodeTypes = ()
        self.showHidden = False
        self.showChildNodeTypes = True
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self.renameEnabled = False
        self.editEnabled = False
        self.noneDisplay = "None"
        self.baseName = ""
        self.selectNodeUponCreation = True

    def _matches(self, node) -> bool:
        if node is None or node.GetScene() is not self._scene:
            return False
        types_ = list(self.nodeTypes)
        if not any(node.IsA(t) for t in types_):
            return False
        if not self.showChildNodeTypes and node.GetClassName() not in types_:
            return False
        if any(node.IsA(t) for t in self.hideChildNodeTypes):
            return False
        return self.showHidden or not node.GetHideFromEditors()

    def nodes(self) -> list:
        if self._scene is None:
            return []
        nodes = [self._scene.GetNthNode(i) for i in range(self._scene.GetNumberOfNodes())]
        return [n for n in nodes if self._matches(n)]

    def nodeCount(self) -> int:
        return len(self.nodes())

    def _has_action_items(self) -> bool:
        return bool(self.addEnabled or self.removeEnabled or self.renameEnabled or self.editEnabled)

    def _select(self, node) -> None:
        if node is not self._current:
            self._current = node
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    def setMRMLScene(self, scene) -> None:
        import vtk  # noqa: PLC0415

        if scene is self._scene:
            return
        for obj, tag in self._observers:
            obj.RemoveObserver(tag)
        self._observers = []
        self._scene = scene
        self._current = None
        if scene is None:
            return

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def added(caller, event, node):
            if self._matches(node):
                if self._current is None and not self.noneEnabled and not self._has_action_items() \
                        and self.nodeCount() == 1:
                    self._select(node)
                self.nodeAdded.emit(node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def about_to_be_removed(caller, event, node):
            # qMRMLSceneModel removes the node's row on NodeAboutToBeRemovedEvent, observed at
            # priority -10 (after the default-priority observers), and not while the scene closes
            # (qMRMLSceneModel.cxx, setMRMLScene and onMRMLSceneNodeAboutToBeRemoved: v5.8.1 lines
            # 366 and 1222-1230, main 381 and 1184-1194). QComboBox then moves its current index to
            # the row that took the removed one's place, or to the last row when it was the last
            # (Qt 5 qcombobox.cpp, QComboBoxPrivate::_q_rowsRemoved:
            # setCurrentIndex(qMin(count() - 1, qMax(indexBeforeChange, 0)))); if that row is an
            # action item ("Create new ..."), qMRMLNodeComboBox::emitCurrentNodeChanged selects the
            # last node instead, and with no node left refreshIfCurrentNodeHidden selects nothing
            # (qMRMLNodeComboBox.cxx: v5.8.1 lines 752-772 and 1271-1283, main 719-743 and
            # 1246-1258). Either way: the node that followed the removed one, else the last node.
            if node is not self._current or scene.IsClosing():
                return
            before = self.nodes()
            row = before.index(node) if node in before else len(before)
            rest = [n for n in before if n is not node]
            self._select(rest[row] if row < len(rest) else (rest[-1] if rest else None))

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def removed(caller, event, node):
            # while the scene closes the model is reset at the end; the current node is then gone
            if node is self._current:
                self._select(None)

        self._observers = [(scene, scene.AddObserver(scene.NodeAddedEvent, added)),
                           (scene, scene.AddObserver(scene.NodeAboutToBeRemovedEvent, about_to_be_removed, -10.0)),
                           (scene, scene.AddObserver(scene.NodeRemovedEvent, removed))]
        first = self.nodes()
        if first and not self.noneEnabled:
            self._select(first[0])

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        if self._current is not None and not self._matches(self._current):
            self._current = None
        return self._current

    @property
    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node) -> None:
        if isinstance(node, str):
            node = self._scene.GetNodeByID(node) if self._scene is not None else None
        self._select(node if self._matches(node) else None)

    def setCurrentNodeID(self, node_id: str) -> None:
        self.setCurrentNode(node_id)


# --------------------------------------------------------------------------------------------------
# module objects


QT_CLASSES = (
    QObject, QWidget, QLayout, QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout, QLabel, QAbstractButton,
    QPushButton, QToolButton, QCheckBox, QStandardItem, QStandardItemModel, QComboBox, QAbstractSpinBox,
    QDoubleSpinBox, QSpinBox, QSlider, QLineEdit, QTextEdit, QProgressBar, QFrame, QGroupBox, QDialog,
    QMessageBox, QMainWindow, Qt, QSettings, QIcon, QFile, QDir, QColor, QTimer, QCursor, QApplication, QThread, QEventLoop,
    QSize, QSizePolicy, QUiLoader,
)
CTK_CLASSES = (
    ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkCheckBox, ctkComboBox, ctkDoubleSpinBox, ctkSliderWidget,
    ctkDoubleSlider, ctkRangeWidget, ctkDoubleRangeSlider, ctkPathLineEdit, ctkDirectoryButton,
    ctkCheckablePushButton, ctkColorPickerButton, ctkMessageBox, ctkFlowLayout,
)
#: MRML widget stand-ins put into the ``slicer`` namespace (where PythonQt's kits would put them);
#: the slider/spin/range ones exist so Slicer's GUI connectors can name them in ``type(w) in (...)``.
MRML_WIDGET_CLASSES = {
    "qSlicerWidget": qSlicerWidget, "qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox,
    "qMRMLSliderWidget": type("qMRMLSliderWidget", (QDoubleSpinBox,), {}),
    "qMRMLSpinBox": type("qMRMLSpinBox", (QDoubleSpinBox,), {}),
    "qMRMLRangeWidget": type("qMRMLRangeWidget", (ctkRangeWidget,), {}),
}


def make_module(name: str, classes) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in for {name} (MedicalFusion's Slicer test harness)")
    for cls in classes:
        setattr(module, cls.__name__, cls)
    return module


def reset_state() -> None:
    """Forget settings, shown message boxes and pending timers (a fresh application)."""
    QSettings.store = {}
    QMessageBox.shown = []
    QMessageBox.answer = QMessageBox.Cancel
    QTimer.pending = []
    QApplication.overrides = []


# --------------------------------------------------------------------------------------------------
# .ui files


def _value(prop: ET.Element):
    node = next(iter(prop))
    tag, text = node.tag, node.text or ""
    if tag == "string":
        return text
    if tag == "bool":
        return text.strip() == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return tuple(s.text or "" for s in node.iter("string"))
    return text   # enum, set, rect, size...: not used by the code under test


#: properties a .ui may set that the stand-ins do not model (layout and look only)
_IGNORED = {"geometry", "sizeHint", "orientation", "textInteractionFlags", "sizePolicy", "alignment",
            "minimumSize", "maximumSize", "leftMargin", "rightMargin", "topMargin", "bottomMargin", "spacing",
            "windowTitle", "font", "frameShape", "icon", "iconSize", "flat"}


def _apply_properties(obj, elem: ET.Element) -> None:
    for prop in elem.findall("property"):
        name = prop.get("name")
        value = _value(prop)
        if prop.get("stdset") == "0":
            obj.setProperty(name, value)
        elif name == "visible":
            obj.visible = value
        elif name == "enabled":
            obj.enabled = value
        elif name not in _IGNORED:
            setattr(obj, name, value)


def _build_layout(elem: ET.Element, owner, resolve):
    layout = resolve(elem.get("class"))()
    layout.objectName = elem.get("name") or ""
    return layout


def _fill_layout(layout, elem: ET.Element, owner, resolve, names: dict) -> None:
    for item in elem.findall("item"):
        child = item.find("widget")
        if child is not None:
            layout.addWidget(_build_widget(child, owner, resolve, names))
            continue
        sub = item.find("layout")
        if sub is not None:
            nested = _build_layout(sub, owner, resolve)
            layout.addLayout(nested)
            names[nested.objectName] = nested
            _fill_layout(nested, sub, owner, resolve, names)


def _build_widget(elem: ET.Element, parent, resolve, names: dict):
    widget = resolve(elem.get("class"))()
    widget.objectName = elem.get("name") or ""
    if parent is not None:
        widget.setParent(parent)
    names[widget.objectName] = widget
    _apply_properties(widget, elem)
    for child in elem:
        if child.tag == "widget":
            _build_widget(child, widget, resolve, names)
        elif child.tag == "layout":
            layout = _build_layout(child, widget, resolve)
            widget.setLayout(layout)
            names[layout.objectName] = layout
            _fill_layout(layout, child, widget, resolve, names)
    return widget


def load_ui(path, resolve, parent=None):
    """Build the .ui at ``path`` with ``resolve(class name) -> class``; wire its <connections>."""
    root = ET.parse(str(path)).getroot()
    names: dict = {}
    top = _build_widget(root.find("widget"), parent, resolve, names)
    for conn in root.iter("connection"):
        sender, receiver = names[conn.findtext("sender")], names[conn.findtext("receiver")]
        slot = getattr(receiver, conn.findtext("slot").split("(")[0])
        getattr(sender, conn.findtext("signal").split("(")[0]).connect(slot)
    return top
